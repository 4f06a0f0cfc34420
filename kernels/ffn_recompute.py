"""The ffn/block recompute kernel: two GEMMs on one output tile, LN2 in the FC1 prologue, GELU/GELU' in the epilogue.

For x1 (M, K), w1 (N, K), dy (M, K), w2 (K, N) with any weight strides, with M = rows, K = d, N = H, both GEMMs
reduce over K = d and produce the same (BLOCK_M, BLOCK_N) tile, so one K-loop carries two fp32 accumulators:
    prologue, per K-step:  y = (x1 - mean) · rstd · ln_w + ln_b           fp32, (BLOCK_M, BLOCK_K) tile in registers
    main loop:             acc_u += y @ w1ᵀ;   acc_da += dy @ w2         fp32 accumulate
    epilogue:              u = acc_u + b1;  a = gelu(u);  du = gelu'(u) · acc_da
                           → a, du (M, N) in dy.dtype;  db1_part[pid_m, :] = Σ_rows du (fp32, before rounding)
Neither the LN output, u nor dA reaches memory: bytes = x1 + w1 + dy + w2 + a + du + grid_m·N·4.
db1 is deterministic (no atomics): each program writes its own column partial sums into row pid_m of an fp32
(grid_m, N) scratch that the launcher reduces. Every autotune config of this kernel must share one BLOCK_M, so that
the scratch's shape is known before tuning and every row is rewritten by whichever config runs.
UPCAST (constexpr): load operands as fp32 and run fp32 dots (fp32 inputs, mixed dtypes, and always under the
interpreter, whose bf16 dots are wrong); otherwise the LN tile is cast to w1's 16-bit dtype for tensor-core dots.
Programs walk output tiles in GROUP_M-row super-groups so that neighbouring programs share weight tiles in L2.
"""

import triton
import triton.language as tl

from .gelu_math import gelu_and_grad
from .matmul_configs import DUAL_AUTOTUNE, dual_configs


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
    W1,  # (N, K) strides (stride_w1n, stride_w1k): FC1 weight (H, d), possibly a transposed view
    B1,  # (N,) FC1 bias
    DY,  # (M, K) row stride stride_dym, unit column stride: gradient of the FC2 output (after dropout)
    W2,  # (K, N) strides (stride_w2k, stride_w2n): FC2 weight (d, H), possibly a transposed view
    A_OUT,  # (M, N) contiguous, dy.dtype: a = gelu(u)
    DU_OUT,  # (M, N) contiguous, dy.dtype: du = gelu'(u) · dA
    DB1_PART,  # (cdiv(M, BLOCK_M), N) contiguous fp32: per-row-block column sums of du
    M,
    N,
    K,
    stride_xm,
    stride_w1n,
    stride_w1k,
    stride_dym,
    stride_w2k,
    stride_w2n,
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
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_da = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        mk = m_ok[:, None] & k_ok[None, :]
        kn = k_ok[:, None] & n_ok[None, :]
        x = tl.load(X1 + rm64[:, None] * stride_xm + kk[None, :], mask=mk, other=0.0)
        lw = tl.load(LN_W + kk, mask=k_ok, other=0.0).to(tl.float32)
        lb = tl.load(LN_B + kk, mask=k_ok, other=0.0).to(tl.float32)
        y = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
        w1 = tl.load(W1 + rn[None, :] * stride_w1n + kk[:, None] * stride_w1k, mask=kn, other=0.0)
        g = tl.load(DY + rm64[:, None] * stride_dym + kk[None, :], mask=mk, other=0.0)
        w2 = tl.load(W2 + kk[:, None] * stride_w2k + rn[None, :] * stride_w2n, mask=kn, other=0.0)
        if UPCAST:
            acc_u = tl.dot(y, w1.to(tl.float32), acc_u, input_precision="ieee")
            acc_da = tl.dot(g.to(tl.float32), w2.to(tl.float32), acc_da, input_precision="ieee")
        else:
            acc_u = tl.dot(y.to(w1.dtype), w1, acc_u)
            acc_da = tl.dot(g, w2, acc_da)
    b1 = tl.load(B1 + rn, mask=n_ok, other=0.0).to(tl.float32)
    act, grad = gelu_and_grad(acc_u + b1[None, :], APPROX_TANH)
    mask = m_ok[:, None] & n_ok[None, :]
    du = tl.where(mask, grad * acc_da, 0.0)
    out = rm64[:, None] * N + rn[None, :]
    tl.store(A_OUT + out, act.to(A_OUT.dtype.element_ty), mask=mask)
    tl.store(DU_OUT + out, du.to(DU_OUT.dtype.element_ty), mask=mask)
    tl.store(DB1_PART + pid_m.to(tl.int64) * N + rn, tl.sum(du, axis=0), mask=n_ok)


ffn_recompute_autotuned = triton.autotune(configs=dual_configs(), **DUAL_AUTOTUNE)(ffn_recompute_kernel)
