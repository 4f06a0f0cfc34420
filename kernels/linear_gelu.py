"""FC1 forward of the ffn/block policies: a matmul with bias + GELU in its epilogue (u is never written).

out (M, N) = gelu(x (M, K) @ w (N, K)ᵀ + b (N,))                  M = rows, K = d, N = H
    main loop:  acc += x @ wᵀ (fp32);   epilogue: u = acc + b;  a = gelu(u) → out in x.dtype
bytes = x + w + b + out (u would add 2·M·N·2 bytes: write it, read it back for the GELU).
Operands are read through their strides (a transposed Conv1D weight or a strided x costs no copy).
HAS_BIAS (constexpr): add b. UPCAST (constexpr): fp32 loads and ieee fp32 dots (fp32 inputs, mixed dtypes, and
always under the interpreter, whose bf16 dots are wrong). Grouped tile order as in ffn_recompute.
"""

import triton
import triton.language as tl

from .ffn_recompute import tile_ids
from .gelu_math import gelu_and_grad
from .matmul_configs import AUTOTUNE, configs


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
    act, _ = gelu_and_grad(acc, APPROX_TANH)
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(OUT + rm64[:, None] * N + rn[None, :], act.to(OUT.dtype.element_ty), mask=mask)


linear_bias_gelu_autotuned = triton.autotune(configs=configs(), **AUTOTUNE)(linear_bias_gelu_kernel)
