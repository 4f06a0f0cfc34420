"""The pointwise policy's FFN backward matmuls: GELU' fused into the dA epilogue, GELU into the dW2 prologue.

linear_gelu_bwd_kernel   du (M, N) = (dy (M, K) @ w2 (K, N)) · gelu'(u (M, N))      M = rows, K = d, N = H
    epilogue loads the saved u tile; dA never reaches memory.          bytes = dy + w2 + u + du
gelu_linear_wgrad_kernel dw2 (M, N) = dyᵀ (M, K) @ gelu(u) (K, N)                   M = d, K = rows, N = H
    prologue applies GELU to each u tile (rounded to u's dtype, as the kept a would be); a never reaches memory.
Operands are read through their strides (a transposed w2 or dy costs no copy). Tile order, operand loads and
the UPCAST dot from matmul_tiles.
"""

import triton
import triton.language as tl

from .gelu_math import gelu_and_grad
from .matmul_configs import AUTOTUNE, configs
from .matmul_tiles import k_slice, load_a, load_b, load_tile, matmul_tile, mma, store_tile, tile_offsets


@triton.jit
def linear_gelu_bwd_kernel(
    DY,  # (M, K) strides (stride_dym, stride_dyk): gradient of the FC2 output (after dropout)
    W2,  # (K, N) strides (stride_wk, stride_wn): FC2 weight (d, H), possibly a transposed view
    U,  # (M, N) row stride stride_um, unit column stride: saved pre-activation
    DU,  # (M, N) contiguous, u.dtype
    M,
    N,
    K,
    stride_dym,
    stride_dyk,
    stride_wk,
    stride_wn,
    stride_um,
    APPROX_TANH: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    acc, rm, rn, m_ok, n_ok = matmul_tile(DY, W2, M, N, K, stride_dym, stride_dyk, stride_wk, stride_wn, UPCAST,
                                          BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)  # fmt: skip
    mask = m_ok[:, None] & n_ok[None, :]
    _, grad = gelu_and_grad(load_tile(U, rm, rn, stride_um, mask), APPROX_TANH)
    store_tile(DU, rm, rn, N, acc * grad, mask)


@triton.jit
def gelu_linear_wgrad_kernel(
    DY,  # (K, M) strides (stride_dyk, stride_dym): gradient of the FC2 output, read transposed
    U,  # (K, N) row stride stride_uk, unit column stride: saved pre-activation
    DW,  # (M, N) contiguous, dy.dtype: FC2 weight gradient (d, H)
    M,
    N,
    K,
    stride_dyk,
    stride_dym,
    stride_uk,
    APPROX_TANH: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    _pid_m, rm, rn, m_ok, n_ok = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk, k_ok = k_slice(k0, K, BLOCK_K)
        kk = kk.to(tl.int64)
        a = load_a(DY, rm, kk, stride_dym, stride_dyk, m_ok, k_ok)  # (BLOCK_M, BLOCK_K)
        u = load_b(U, kk, rn, stride_uk, 1, k_ok, n_ok)  # (BLOCK_K, BLOCK_N)
        act, _ = gelu_and_grad(u.to(tl.float32), APPROX_TANH)
        if not UPCAST:
            act = act.to(u.dtype)
        acc = mma(a, act, acc, UPCAST)
    store_tile(DW, rm.to(tl.int64), rn, N, acc, m_ok[:, None] & n_ok[None, :])


linear_gelu_bwd_autotuned = triton.autotune(configs=configs(), **AUTOTUNE)(linear_gelu_bwd_kernel)
gelu_linear_wgrad_autotuned = triton.autotune(configs=configs(), **AUTOTUNE)(gelu_linear_wgrad_kernel)
