"""The pointwise policy's SwiGLU input-gradient matmul: dg/du in the dH epilogue (dW_down, with h rebuilt in its
prologue, is act_linear_wgrad).

swiglu_linear_bwd_kernel    dH (M, N) = dy (M, K) @ w_down (K, N)  (fp32, never stored)     M = rows, K = d, N = F
    epilogue loads the kept g, u tiles: dg = dH · u · silu'(g) → g.dtype, du = dH · silu(g) → u.dtype
    bytes = dy + w_down + g + u + dg + du
Operands are read through their strides (w_down is Hugging Face's down_proj weight (d, F)).
Tile setup and K-loop from matmul_tiles; SwiGLU math from swiglu_math.
"""

import triton
import triton.language as tl

from .matmul_configs import AUTOTUNE, configs
from .matmul_tiles import load_tile, matmul_tile, store_tile
from .swiglu_math import swiglu_grads


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


swiglu_linear_bwd_autotuned = triton.autotune(configs=configs(), **AUTOTUNE)(swiglu_linear_bwd_kernel)
