"""The pointwise policies' weight gradient of the MLP's last matmul, with the activation rebuilt in the B prologue.

dW (M, N) = dyᵀ (M, K) @ a (K, N)          M = d, K = rows, N = H (GELU) or F (SwiGLU): the FC2 / down_proj weight
    prologue, per (BLOCK_K, BLOCK_N) tile, from the kept pre-activations (a never reaches memory):
        ACT "gelu" / "gelu_tanh":  a = gelu(u) (exact / tanh form)                         bytes = dy + u + dW
        ACT "swiglu":              a = silu(g) · u rounded to g.dtype, as the kept h would be  bytes = dy + g + u + dW
    then a goes to the dot in the kept tile's 16-bit dtype (fp32 when UPCAST).
dy is read transposed through its strides; g, u have unit column strides (G is not read for the GELU forms).
UPCAST (constexpr): fp32 operands and ieee fp32 dots (fp32 inputs, mixed dtypes, and always under the interpreter).
Tile order, operand loads and the dot from matmul_tiles; the activations from gelu_math / swiglu_math.
"""

import triton
import triton.language as tl

from .gelu_math import gelu_and_grad
from .matmul_configs import AUTOTUNE, configs
from .matmul_tiles import k_slice, load_a, load_b, mma, store_tile, tile_offsets
from .rounding import round_to
from .swiglu_math import swiglu


@triton.jit
def act_linear_wgrad_kernel(
    DY,  # (K, M) strides (stride_dyk, stride_dym): gradient of the FC2 / down_proj output, read transposed
    G,  # (K, N) row stride stride_gk, unit column stride: kept gate pre-activation (read only for "swiglu")
    U,  # (K, N) row stride stride_uk, unit column stride: kept (up / FC1) pre-activation
    DW,  # (M, N) contiguous, dy.dtype: weight gradient (d, H or F)
    M,
    N,
    K,
    stride_dyk,
    stride_dym,
    stride_gk,
    stride_uk,
    ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, rm, rn, m_ok, n_ok = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk, k_ok = k_slice(k0, K, BLOCK_K)
        kk = kk.to(tl.int64)
        a = load_a(DY, rm, kk, stride_dym, stride_dyk, m_ok, k_ok)  # (BLOCK_M, BLOCK_K)
        if ACT == "swiglu":
            g = load_b(G, kk, rn, stride_gk, 1, k_ok, n_ok)  # (BLOCK_K, BLOCK_N)
            u = load_b(U, kk, rn, stride_uk, 1, k_ok, n_ok)
            b = round_to(swiglu(g.to(tl.float32), u.to(tl.float32)), g.dtype)
        else:
            u = load_b(U, kk, rn, stride_uk, 1, k_ok, n_ok)
            b, _ = gelu_and_grad(u.to(tl.float32), ACT == "gelu_tanh")
        if not UPCAST:
            b = b.to(U.dtype.element_ty)
        acc = mma(a, b, acc, UPCAST)
    store_tile(DW, rm.to(tl.int64), rn, N, acc, m_ok[:, None] & n_ok[None, :])


act_linear_wgrad_autotuned = triton.autotune(configs=configs(), **{**AUTOTUNE, "key": ["M", "N", "K", "ACT"]})(
    act_linear_wgrad_kernel
)
