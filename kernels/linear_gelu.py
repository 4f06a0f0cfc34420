"""FC1 forward of the ffn/block policies: a matmul with bias + GELU in its epilogue (u is never written).

out (M, N) = gelu(x (M, K) @ w (N, K)ᵀ + b (N,))                  M = rows, K = d, N = H
    main loop:  acc += x @ wᵀ (fp32);   epilogue: u = acc + b;  a = gelu(u) → out in x.dtype
bytes = x + w + b + out (u would add 2·M·N·2 bytes: write it, read it back for the GELU).
Operands are read through their strides (a transposed Conv1D weight or a strided x costs no copy).
HAS_BIAS (constexpr): add b. UPCAST (constexpr): fp32 loads and ieee fp32 dots (fp32 inputs, mixed dtypes, and
always under the interpreter, whose bf16 dots are wrong). Tile order and K-loop from matmul_tiles.
"""

import triton
import triton.language as tl

from .gelu_math import gelu_and_grad
from .matmul_configs import AUTOTUNE, configs
from .matmul_tiles import add_bias, matmul_tile, store_tile


@triton.jit
def linear_bias_gelu_kernel(
    X,  # (M, K) strides (stride_xm, stride_xk): FC1 input (the LN2 output)
    W,  # (N, K) strides (stride_wn, stride_wk): FC1 weight (H, d), possibly a transposed view
    B,  # (N,) FC1 bias (unused when HAS_BIAS is False)
    OUT,  # (M, N) contiguous, x.dtype: a = gelu(x @ wᵀ + b)
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    HAS_BIAS: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    acc, rm, rn, m_ok, n_ok = matmul_tile(X, W, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn, UPCAST, BLOCK_M,
                                          BLOCK_N, BLOCK_K, GROUP_M)  # fmt: skip
    act, _ = gelu_and_grad(add_bias(acc, B, rn, n_ok, HAS_BIAS), APPROX_TANH)
    store_tile(OUT, rm, rn, N, act, m_ok[:, None] & n_ok[None, :])


linear_bias_gelu_autotuned = triton.autotune(configs=configs(), **AUTOTUNE)(linear_bias_gelu_kernel)
