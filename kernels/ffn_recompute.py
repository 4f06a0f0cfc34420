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
Programs walk output tiles in GROUP_M-row super-groups (matmul_tiles.tile_ids) so that neighbouring programs share
weight tiles in L2; operand loads and the UPCAST dot are matmul_tiles helpers too.
"""

import triton
import triton.language as tl

from .gelu_math import gelu_and_grad
from .matmul_configs import DUAL_AUTOTUNE, dual_configs
from .matmul_tiles import k_slice, load_a, load_bias, mma_ab, mma_b, store_tile, tile_offsets


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
    pid_m, rm, rn, m_ok, n_ok = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    mean = tl.load(MEAN + rm, mask=m_ok, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rm, mask=m_ok, other=0.0).to(tl.float32)
    rm = rm.to(tl.int64)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_da = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk, k_ok = k_slice(k0, K, BLOCK_K)
        x = load_a(X1, rm, kk, stride_xm, 1, m_ok, k_ok)
        lw = tl.load(LN_W + kk, mask=k_ok, other=0.0).to(tl.float32)
        lb = tl.load(LN_B + kk, mask=k_ok, other=0.0).to(tl.float32)
        y = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
        if not UPCAST:
            y = y.to(W1.dtype.element_ty)
        acc_u = mma_b(y, W1, kk, rn, stride_w1k, stride_w1n, k_ok, n_ok, acc_u, UPCAST)
        acc_da = mma_ab(DY, W2, rm, kk, rn, stride_dym, 1, stride_w2k, stride_w2n, m_ok, k_ok, n_ok, acc_da, UPCAST)
    act, grad = gelu_and_grad(acc_u + load_bias(B1, rn, n_ok), APPROX_TANH)
    mask = m_ok[:, None] & n_ok[None, :]
    du = tl.where(mask, grad * acc_da, 0.0)
    store_tile(A_OUT, rm, rn, N, act, mask)
    store_tile(DU_OUT, rm, rn, N, du, mask)
    tl.store(DB1_PART + pid_m.to(tl.int64) * N + rn, tl.sum(du, axis=0), mask=n_ok)


ffn_recompute_autotuned = triton.autotune(configs=dual_configs(), **DUAL_AUTOTUNE)(ffn_recompute_kernel)
