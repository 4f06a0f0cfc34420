"""The pointwise policy's SwiGLU backward matmuls: dg/du in the dH epilogue, h rebuilt in the dW_down prologue.

swiglu_linear_bwd_kernel    dH (M, N) = dy (M, K) @ w_down (K, N)  (fp32, never stored)     M = rows, K = d, N = F
    epilogue loads the kept g, u tiles: dg = dH · u · silu'(g) → g.dtype, du = dH · silu(g) → u.dtype
    bytes = dy + w_down + g + u + dg + du
swiglu_linear_wgrad_kernel  dW_down (M, N) = dyᵀ (M, K) @ h (K, N)                          M = d, K = rows, N = F
    prologue: h = silu(g) · u per (BLOCK_K, BLOCK_N) tile, rounded to g.dtype as the kept h would be; h never
    reaches memory.    bytes = dy + g + u + dW_down
Operands are read through their strides (w_down is Hugging Face's down_proj weight (d, F), dy is read transposed).
Tile order, operand loads and the UPCAST dot from matmul_tiles; SwiGLU math from swiglu_math.
"""

import triton
import triton.language as tl

from .matmul_configs import AUTOTUNE, configs
from .matmul_tiles import k_slice, load_a, load_b, load_tile, matmul_tile, mma, store_tile, tile_offsets
from .rounding import round_to
from .swiglu_math import swiglu, swiglu_grads


@triton.jit
def swiglu_linear_bwd_kernel(
    DY,  # (M, K) strides (stride_dym, stride_dyk): gradient of the down_proj output
    WD,  # (K, N) strides (stride_wk, stride_wn): down_proj weight (d, F)
    G,  # (M, N) row stride stride_gm, unit column stride: kept gate pre-activation
    U,  # (M, N) row stride stride_um, unit column stride: kept up projection
    DG,  # (M, N) contiguous, g.dtype
    DU,  # (M, N) contiguous, u.dtype
    M,
    N,
    K,
    stride_dym,
    stride_dyk,
    stride_wk,
    stride_wn,
    stride_gm,
    stride_um,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    dh, rm, rn, m_ok, n_ok = matmul_tile(DY, WD, M, N, K, stride_dym, stride_dyk, stride_wk, stride_wn, UPCAST,
                                         BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)  # fmt: skip
    mask = m_ok[:, None] & n_ok[None, :]
    dg, du = swiglu_grads(dh, load_tile(G, rm, rn, stride_gm, mask), load_tile(U, rm, rn, stride_um, mask))
    store_tile(DG, rm, rn, N, dg, mask)
    store_tile(DU, rm, rn, N, du, mask)


@triton.jit
def swiglu_linear_wgrad_kernel(
    DY,  # (K, M) strides (stride_dyk, stride_dym): gradient of the down_proj output, read transposed
    G,  # (K, N) row stride stride_gk, unit column stride: kept gate pre-activation
    U,  # (K, N) row stride stride_uk, unit column stride: kept up projection
    DW,  # (M, N) contiguous, dy.dtype: down_proj weight gradient (d, F)
    M,
    N,
    K,
    stride_dyk,
    stride_dym,
    stride_gk,
    stride_uk,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    _, rm, rn, m_ok, n_ok = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk, k_ok = k_slice(k0, K, BLOCK_K)
        kk = kk.to(tl.int64)
        a = load_a(DY, rm, kk, stride_dym, stride_dyk, m_ok, k_ok)  # (BLOCK_M, BLOCK_K)
        g = load_b(G, kk, rn, stride_gk, 1, k_ok, n_ok)  # (BLOCK_K, BLOCK_N)
        u = load_b(U, kk, rn, stride_uk, 1, k_ok, n_ok)
        h = round_to(swiglu(g.to(tl.float32), u.to(tl.float32)), g.dtype)  # as the kept h would be
        if not UPCAST:
            h = h.to(g.dtype)
        acc = mma(a, h, acc, UPCAST)
    store_tile(DW, rm.to(tl.int64), rn, N, acc, m_ok[:, None] & n_ok[None, :])


swiglu_linear_bwd_autotuned = triton.autotune(configs=configs(), **AUTOTUNE)(swiglu_linear_bwd_kernel)
swiglu_linear_wgrad_autotuned = triton.autotune(configs=configs(), **AUTOTUNE)(swiglu_linear_wgrad_kernel)
