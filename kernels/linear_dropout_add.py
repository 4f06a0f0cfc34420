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
inputs, mixed dtypes, and always under the interpreter, whose bf16 dots are wrong). Grouped tile order as in
ffn_recompute; autotune configs from matmul_configs.
"""

import triton
import triton.language as tl

from .dropout import fmix32
from .ffn_recompute import tile_ids
from .matmul_configs import AUTOTUNE, configs


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 tile rounded to ``dtype`` (nearest-even) and back to fp32. bf16 is rounded with integer ops: the same
    result as the GPU's cvt.rn, and right under the interpreter too, whose fp32 → bf16 cast truncates."""
    if dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        r = tl.where(v != v, v, u.to(tl.float32, bitcast=True))
    else:
        r = v.to(dtype).to(tl.float32)
    return r


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
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(X + rm64[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # fmt: skip
        b = tl.load(W + rn[None, :] * stride_wn + kk[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)  # fmt: skip
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = round_to(acc, X.dtype.element_ty)
    if APPLY_DROPOUT:
        flat = rm64[:, None] * N + rn[None, :]
        k = key.to(tl.uint32, bitcast=True)
        h = fmix32(fmix32(flat.to(tl.uint32) ^ k) + k)
        keep = (h >> 8).to(tl.int32) >= threshold
        y = tl.where(keep, y * scale, 0.0)
    mask = m_ok[:, None] & n_ok[None, :]
    y += tl.load(RES + rm64[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + rm64[:, None] * N + rn[None, :], y.to(OUT.dtype.element_ty), mask=mask)


linear_dropout_add_autotuned = triton.autotune(configs=configs(), **AUTOTUNE)(linear_dropout_add_kernel)
