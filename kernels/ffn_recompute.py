"""The ffn/block recompute kernel: LN2 in the FC1 prologue, bias + GELU + GELU'·dA in its epilogue.

For x1 (M, K), w1 (N, K) with any strides, da (M, N), with M = rows, K = d, N = H:
    prologue, per K-step:  y = (x1 - mean) · rstd · ln_w + ln_b         fp32, (BLOCK_M, BLOCK_K) tile in registers
    main loop:             acc += y @ w1ᵀ                               fp32 accumulate
    epilogue:              u = acc + b1;  a = gelu(u);  du = gelu'(u) · da  → a, du (M, N) in da.dtype
Neither the LN output nor u = LN(x1) @ w1ᵀ + b1 ever reaches memory: bytes = x1 + w1 + da + a + du.
UPCAST (constexpr): load operands as fp32 and run fp32 dots (fp32 inputs, mixed dtypes, and always under the
interpreter, whose bf16 dots are wrong); otherwise the LN tile is cast to w1's 16-bit dtype for tensor-core dots.
Programs walk output tiles in GROUP_M-row super-groups so that neighbouring programs share w1 tiles in L2.
"""

import triton
import triton.language as tl

from .gelu_math import gelu_and_grad
from .matmul_configs import AUTOTUNE, configs


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering of the 1-D launch grid: (pid_m, pid_n) of this program's output tile."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def ffn_recompute_kernel(
    X1,  # (M, K) row stride stride_xm, unit column stride: LN2 input x1
    MEAN,  # (M,) fp32 LN2 mean
    RSTD,  # (M,) fp32 LN2 rstd
    LN_W,  # (K,) LN2 weight
    LN_B,  # (K,) LN2 bias
    W1,  # (N, K) strides (stride_wn, stride_wk): FC1 weight, possibly a transposed view
    B1,  # (N,) FC1 bias
    DA,  # (M, N) row stride stride_dm, unit column stride: gradient of a = gelu(u)
    A_OUT,  # (M, N) contiguous, da.dtype: a = gelu(u)
    DU_OUT,  # (M, N) contiguous, da.dtype: du = gelu'(u) · da
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_wk,
    stride_dm,
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
    mean = tl.load(MEAN + rm, mask=m_ok, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rm, mask=m_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(X1 + rm64[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        lw = tl.load(LN_W + kk, mask=k_ok, other=0.0).to(tl.float32)
        lb = tl.load(LN_B + kk, mask=k_ok, other=0.0).to(tl.float32)
        y = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
        w = tl.load(W1 + rn[None, :] * stride_wn + kk[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)  # fmt: skip
        if UPCAST:
            acc = tl.dot(y, w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(y.to(w.dtype), w, acc)
    b1 = tl.load(B1 + rn, mask=n_ok, other=0.0).to(tl.float32)
    act, grad = gelu_and_grad(acc + b1[None, :], APPROX_TANH)
    mask = m_ok[:, None] & n_ok[None, :]
    da = tl.load(DA + rm64[:, None] * stride_dm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    out = rm64[:, None] * N + rn[None, :]
    tl.store(A_OUT + out, act.to(A_OUT.dtype.element_ty), mask=mask)
    tl.store(DU_OUT + out, (grad * da).to(DU_OUT.dtype.element_ty), mask=mask)


ffn_recompute_autotuned = triton.autotune(configs=configs(), **AUTOTUNE)(ffn_recompute_kernel)
