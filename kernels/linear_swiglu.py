"""Gate/up forward of the SwiGLU MLP: two GEMMs sharing one output tile, SwiGLU in the epilogue (g, u never written).

h (M, N) = silu(x @ w_gateᵀ + b_gate) · (x @ w_upᵀ + b_up)      x (M, K), w_gate/w_up (N, K); M = rows, K = d, N = F
    main loop, per K-step: one x tile feeds two dots   acc_g += x @ w_gateᵀ;  acc_u += x @ w_upᵀ   (fp32)
    epilogue:              g = acc_g + b_gate;  u = acc_u + b_up;  h = silu(g) · u → x.dtype
bytes = x + w_gate + w_up + h (g and u would add 4·M·N·2 bytes: write both, read both back). Two fp32 accumulators
per tile, so it uses the dual-GEMM configs (matmul_configs.DUAL_*: tiles stop at 128×128 with 8 warps).
Operands are read through their strides (the Hugging Face gate_proj / up_proj weights themselves, no concatenation).
HAS_BG / HAS_BU (constexpr): add b_gate / b_up. UPCAST (constexpr): fp32 loads and ieee fp32 dots (fp32 inputs, mixed
dtypes, and always under the interpreter, whose bf16 dots are wrong). Tile order and loads from matmul_tiles.
"""

import triton
import triton.language as tl

from .matmul_configs import DUAL_AUTOTUNE, dual_configs
from .matmul_tiles import add_bias, k_slice, load_a, mma_b, store_tile, tile_offsets
from .swiglu_math import swiglu


@triton.jit
def linear_swiglu_kernel(
    X,  # (M, K) strides (stride_xm, stride_xk): the norm output n2
    WG,  # (N, K) strides (stride_wgn, stride_wgk): gate_proj weight (F, d)
    BG,  # (N,) gate bias (read only when HAS_BG)
    WU,  # (N, K) strides (stride_wun, stride_wuk): up_proj weight (F, d)
    BU,  # (N,) up bias (read only when HAS_BU)
    OUT,  # (M, N) contiguous, x.dtype: h = silu(g) · u
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wgn,
    stride_wgk,
    stride_wun,
    stride_wuk,
    HAS_BG: tl.constexpr,
    HAS_BU: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    _, rm, rn, m_ok, n_ok = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = rm.to(tl.int64)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk, k_ok = k_slice(k0, K, BLOCK_K)
        x = load_a(X, rm, kk, stride_xm, stride_xk, m_ok, k_ok)  # (BLOCK_M, BLOCK_K), feeds both dots
        acc_g = mma_b(x, WG, kk, rn, stride_wgk, stride_wgn, k_ok, n_ok, acc_g, UPCAST)
        acc_u = mma_b(x, WU, kk, rn, stride_wuk, stride_wun, k_ok, n_ok, acc_u, UPCAST)
    h = swiglu(add_bias(acc_g, BG, rn, n_ok, HAS_BG), add_bias(acc_u, BU, rn, n_ok, HAS_BU))
    store_tile(OUT, rm, rn, N, h, m_ok[:, None] & n_ok[None, :])


linear_swiglu_autotuned = triton.autotune(configs=dual_configs(), **DUAL_AUTOTUNE)(linear_swiglu_kernel)
