"""Attention-projection / FC2 forward: a matmul with bias + hash dropout + residual add in its epilogue.

out (M, N) = residual (M, N) + dropout(x (M, K) @ w (N, K)ᵀ + b (N,))          M = rows, K = in features, N = d
    main loop:  acc += x @ wᵀ (fp32)
    epilogue:   y = round_to_x_dtype(acc + b)                        (the GEMM output a separate kernel would store;
                                                                     bias added in fp32, one rounding)
                keep = fmix32(fmix32(i ^ key) + key) >> 8 ≥ threshold,  i = row · N + col (flat (M, N) index, < 2³²)
                out = residual + (keep ? y / (1 - p) : 0)            in fp32, stored in residual.dtype
The mask is bit-identical to ckpt_ext.reference.dropout_keep_mask over a contiguous (M, N) tensor (same fmix32 as
dropout.py; key = fmix32((seed ^ 0x9E3779B9) mod 2³²) computed on the host, passed as its int32 bit pattern).
bytes = x + w + b + residual + out (the projection output would add 2·M·N·elt: write it, read it for the dropout).
x, w and residual are read through their strides (a transposed Conv1D weight or a strided x costs no copy).
HAS_BIAS (constexpr): add b. APPLY_DROPOUT (constexpr): p > 0. UPCAST (constexpr): fp32 loads and ieee fp32 dots (fp32
inputs, mixed dtypes, and always under the interpreter, whose bf16 dots are wrong). Tile order and K-loop from
matmul_tiles; autotune configs from matmul_configs.
"""

import triton
import triton.language as tl

from .dropout import apply_dropout
from .matmul_configs import AUTOTUNE, configs
from .matmul_tiles import add_bias, load_tile, matmul_tile, store_tile
from .rounding import round_to


@triton.jit(do_not_specialize=["key", "threshold"])
def linear_dropout_add_kernel(
    X,  # (M, K) strides (stride_xm, stride_xk): projection input (attention output / GELU activation)
    W,  # (N, K) strides (stride_wn, stride_wk): projection weight (d, K), possibly a transposed view
    B,  # (N,) projection bias (unused when HAS_BIAS is False)
    RES,  # (M, N) strides (stride_rm, 1): residual stream
    OUT,  # (M, N) contiguous, residual.dtype: residual + dropout(x @ wᵀ + b)
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_rm,
    key,  # int32 bit pattern of the uint32 per-seed key
    threshold,  # floor(p · 2²⁴)
    scale,  # 1 / (1 - p)
    HAS_BIAS: tl.constexpr,
    APPLY_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    acc, rm, rn, m_ok, n_ok = matmul_tile(X, W, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn, UPCAST, BLOCK_M,
                                          BLOCK_N, BLOCK_K, GROUP_M)  # fmt: skip
    y = round_to(add_bias(acc, B, rn, n_ok, HAS_BIAS), X.dtype.element_ty)
    if APPLY_DROPOUT:
        y = apply_dropout(y, rm[:, None] * N + rn[None, :], key, threshold, scale)
    mask = m_ok[:, None] & n_ok[None, :]
    store_tile(OUT, rm, rn, N, y + load_tile(RES, rm, rn, stride_rm, mask), mask)


linear_dropout_add_autotuned = triton.autotune(configs=configs(), **AUTOTUNE)(linear_dropout_add_kernel)
