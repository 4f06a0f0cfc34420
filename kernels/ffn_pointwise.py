"""The pointwise policy's FFN input-gradient matmul: GELU' fused into the dA epilogue (dW2, with GELU in its prologue,
is act_linear_wgrad).

linear_gelu_bwd_kernel   du (M, N) = (dy (M, K) @ w2 (K, N)) · gelu'(u (M, N))      M = rows, K = d, N = H
    epilogue loads the saved u tile; dA never reaches memory.          bytes = dy + w2 + u + du
Operands are read through their strides (a transposed w2 costs no copy). Tile setup and K-loop from matmul_tiles.
"""

import triton
import triton.language as tl

from .gelu_math import gelu_and_grad
from .matmul_configs import AUTOTUNE, configs
from .matmul_tiles import load_tile, matmul_tile, store_tile


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


linear_gelu_bwd_autotuned = triton.autotune(configs=configs(), **AUTOTUNE)(linear_gelu_bwd_kernel)
