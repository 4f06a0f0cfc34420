"""Tile setup, K-loop steps and epilogue addressing shared by the fused matmul kernels, as ``@triton.jit`` helpers
(inlined by Triton).

Every kernel computes one (BLOCK_M, BLOCK_N) output tile of C (M, N) = A (M, K) @ B (K, N) in fp32, operands read
through their strides (a (N, K) weight is B read transposed), outputs contiguous (M, N).
tile_ids       grouped ordering of the 1-D launch grid: programs walk output tiles in GROUP_M-row super-groups so
               that neighbouring programs share weight tiles in L2
tile_offsets   this program's (pid_m, rows, cols, row mask, col mask) of its output tile
k_slice        the reduction indices of one K-step and their mask
load_a, load_b the masked (BLOCK_M, BLOCK_K) / (BLOCK_K, BLOCK_N) operand tiles of one K-step through their
               strides (zeros outside the masks); the offsets fixed across the K-loop are added first
mma            acc += a @ b; UPCAST (constexpr): fp32 operands and ieee fp32 dots (fp32 inputs, mixed dtypes, and
               always under the interpreter, whose bf16 dots are wrong); otherwise the operands' own dtype
mma_b          acc += a @ B-tile for an A operand already in registers (a prologue's output, or one x tile feeding
               several dots)
mma_ab         acc += A-tile @ B-tile: one K-step of a plain matmul
matmul_tile    tile setup and the whole K-loop of a kernel with no prologue: the fp32 accumulator, int64 rows, cols
               and their masks
load_tile      an fp32 (BLOCK_M, BLOCK_N) tile of a (M, N) tensor with unit column stride (a kept g, u or residual)
store_tile     a tile into a contiguous (M, N) output, cast to its dtype
load_bias      a (1, BLOCK_N) fp32 bias row
add_bias       acc + that bias row when HAS_BIAS (constexpr), else acc: a fused linear's bias epilogue
Every block size and UPCAST stays a constexpr parameter, so the inlined code is what a hand-written loop compiles to.
"""

import triton
import triton.language as tl


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
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, rm, rn, m_ok, n_ok): row block, row and column indices of this program's output tile, their masks."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, rm, rn, rm < M, rn < N


@triton.jit
def k_slice(k0, K, BLOCK_K: tl.constexpr):
    """(kk, k_ok): the reduction indices k0 .. k0 + BLOCK_K - 1 and which of them are < K."""
    kk = k0 + tl.arange(0, BLOCK_K)
    return kk, kk < K


@triton.jit
def load_a(A, rm, kk, stride_am, stride_ak, m_ok, k_ok):
    """A[rm, kk] through strides (stride_am, stride_ak), 0 where a row or a k is masked off."""
    return tl.load(A + rm[:, None] * stride_am + kk[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :],
                   other=0.0)  # fmt: skip


@triton.jit
def load_b(B, kk, rn, stride_bk, stride_bn, k_ok, n_ok):
    """B[kk, rn] through strides (stride_bk, stride_bn), 0 where a k or a column is masked off."""
    return tl.load(B + rn[None, :] * stride_bn + kk[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :],
                   other=0.0)  # fmt: skip


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b: fp32 operands and an ieee dot when UPCAST, else a tensor-core dot in the operands' dtype."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def mma_b(a, B, kk, rn, stride_bk, stride_bn, k_ok, n_ok, acc, UPCAST: tl.constexpr):
    """acc + a @ B[kk, rn]: a (BLOCK_M, BLOCK_K) already in registers, in B's dtype unless UPCAST."""
    return mma(a, load_b(B, kk, rn, stride_bk, stride_bn, k_ok, n_ok), acc, UPCAST)


@triton.jit
def mma_ab(A, B, rm, kk, rn, stride_am, stride_ak, stride_bk, stride_bn, m_ok, k_ok, n_ok, acc, UPCAST: tl.constexpr):
    """acc + A[rm, kk] @ B[kk, rn]: one (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_N) step of a plain matmul."""
    a = load_a(A, rm, kk, stride_am, stride_ak, m_ok, k_ok)
    return mma_b(a, B, kk, rn, stride_bk, stride_bn, k_ok, n_ok, acc, UPCAST)


@triton.jit
def matmul_tile(
    A,  # (M, K) strides (stride_am, stride_ak)
    B,  # (K, N) strides (stride_bk, stride_bn), e.g. a (N, K) weight read transposed
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """(acc, rm, rn, m_ok, n_ok): the fp32 (BLOCK_M, BLOCK_N) accumulator of A[rm, :] @ B[:, rn] for this program's
    output tile, its rows (int64: M · stride_am may pass 2³¹), columns and their masks."""
    _, rm, rn, m_ok, n_ok = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk, k_ok = k_slice(k0, K, BLOCK_K)
        acc = mma_ab(A, B, rm, kk, rn, stride_am, stride_ak, stride_bk, stride_bn, m_ok, k_ok, n_ok, acc, UPCAST)
    return acc, rm, rn, m_ok, n_ok


@triton.jit
def load_tile(P, rm, rn, stride_m, mask):
    """P[rm, rn] of a (M, N) tensor with row stride stride_m and unit column stride, as fp32, 0 where masked off."""
    return tl.load(P + rm[:, None] * stride_m + rn[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(P, rm, rn, N, v, mask):
    """P[rm, rn] = v cast to P's dtype, P a contiguous (M, N) output (rm int64 where M · N may pass 2³¹)."""
    tl.store(P + (rm[:, None] * N + rn[None, :]), v.to(P.dtype.element_ty), mask=mask)  # one offset for all stores


@triton.jit
def load_bias(B, rn, n_ok):
    """B[rn] of a (N,) bias as a (1, BLOCK_N) fp32 row, 0 where masked off."""
    return tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def add_bias(acc, B, rn, n_ok, HAS_BIAS: tl.constexpr):
    """acc + B[rn] as a (1, BLOCK_N) fp32 row when HAS_BIAS, else acc unchanged."""
    if HAS_BIAS:
        acc += load_bias(B, rn, n_ok)
    return acc
