"""The SwiGLU ffn/block recompute: RMSNorm prologue, three GEMMs on one output tile, SwiGLU/SwiGLU' epilogue.

For x1 (M, K), w_gate/w_up (N, K), dy (M, K), w_down (K, N) (M = rows, K = d, N = F) all three GEMMs reduce over
K = d and produce the same (BLOCK_M, BLOCK_N) tile, so one K-loop carries three fp32 accumulators:
    prologue, per K-step:  n = w_norm · round_x(x1 · rstd) (rounded to x1.dtype when ROUND_Y), cast to dy.dtype
    main loop:             acc_g += n @ w_gateᵀ;  acc_u += n @ w_upᵀ;  acc_dh += dy @ w_down       (fp32)
    epilogue:              g = acc_g + b_gate, u = acc_u + b_up;  h = silu(g) · u,  dg, du from acc_dh
                           → h, dg, du (M, N) in dy.dtype, and nothing else
Neither the norm output, g, u nor dH reaches memory: bytes = x1 + rstd + w_gate + w_up + dy + w_down + 3·M·N.

One pass, not two. A two-pass split (gate/up first, storing g and u, then dH with the SwiGLU' epilogue) writes and
re-reads 2·M·N 16-bit values (Llama-3-8B, 4096 tokens: 470 MB, ~110 µs at 4.3 TB/s, +6% on the op's 1.83 ms of
GEMM at 788 TF/s) and runs the norm prologue over a second operand stream; a split over
two K-loops inside one program keeps three live fp32 tiles in the second loop anyway (acc_dh plus two SwiGLU'
factors). So the register budget is met by the tile instead: three (BLOCK_M, BLOCK_N) fp32 accumulators are
3·BLOCK_M·BLOCK_N / (32·warps) registers per thread, 96 for 128×64 with 8 warps (matmul_configs.TRIPLE_*), leaving
room for the operand fragments and the epilogue below the 255-register limit; 128×128 (192 registers for the
accumulators alone) spills. The compile lane (compile_check) checks every shipped config for spills.
ROUND_N (constexpr): x1 · rstd rounded to x1.dtype (Hugging Face's ``.to(input_dtype)``; False for fp32 x1).
ROUND_Y (constexpr): the norm output rounded to x1.dtype (x1 and w_norm share a 16-bit dtype, so RMSNorm's output
dtype is x1.dtype) before the cast to dy.dtype.
UPCAST (constexpr): fp32 operands and ieee fp32 dots (fp32 inputs, mixed dtypes, and always under the interpreter);
otherwise tensor-core dots in dy's 16-bit dtype. Every rounding of the norm output is rounding.round_to (nearest-even,
also under the interpreter), so the GEMM sees the values Hugging Face's RMSNorm hands its gate/up projections.
"""

import triton
import triton.language as tl

from .matmul_configs import TRIPLE_AUTOTUNE, triple_configs
from .matmul_tiles import add_bias, k_slice, load_a, mma_ab, mma_b, store_tile, tile_offsets
from .rounding import round_to
from .swiglu_math import swiglu_and_grads


@triton.jit
def swiglu_ffn_recompute_kernel(
    X1,  # (M, K) row stride stride_xm, unit column stride: RMSNorm2 input x1
    RSTD,  # (M,) fp32 RMSNorm2 rstd
    NW,  # (K,) RMSNorm2 weight
    WG,  # (N, K) strides (stride_wgn, stride_wgk): gate_proj weight (F, d)
    BG,  # (N,) gate bias (read only when HAS_BG)
    WU,  # (N, K) strides (stride_wun, stride_wuk): up_proj weight (F, d)
    BU,  # (N,) up bias (read only when HAS_BU)
    DY,  # (M, K) row stride stride_dym, unit column stride: gradient of the down_proj output
    WD,  # (K, N) strides (stride_wdk, stride_wdn): down_proj weight (d, F)
    H_OUT,  # (M, N) contiguous, dy.dtype: h = silu(g) · u (for dW_down)
    DG_OUT,  # (M, N) contiguous, dy.dtype
    DU_OUT,  # (M, N) contiguous, dy.dtype
    M,
    N,
    K,
    stride_xm,
    stride_wgn,
    stride_wgk,
    stride_wun,
    stride_wuk,
    stride_dym,
    stride_wdk,
    stride_wdn,
    HAS_BG: tl.constexpr,
    HAS_BU: tl.constexpr,
    ROUND_N: tl.constexpr,
    ROUND_Y: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    _, rm, rn, m_ok, n_ok = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rstd = tl.load(RSTD + rm, mask=m_ok, other=0.0).to(tl.float32)  # (BLOCK_M,)
    rm = rm.to(tl.int64)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_dh = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk, k_ok = k_slice(k0, K, BLOCK_K)
        x = load_a(X1, rm, kk, stride_xm, 1, m_ok, k_ok)  # (BLOCK_M, BLOCK_K)
        n = x.to(tl.float32) * rstd[:, None]
        if ROUND_N:
            n = round_to(n, X1.dtype.element_ty)
        n = tl.load(NW + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :] * n
        if ROUND_Y:
            n = round_to(n, X1.dtype.element_ty)
        n = round_to(n, DY.dtype.element_ty)
        if not UPCAST:
            n = n.to(DY.dtype.element_ty)
        acc_g = mma_b(n, WG, kk, rn, stride_wgk, stride_wgn, k_ok, n_ok, acc_g, UPCAST)
        acc_u = mma_b(n, WU, kk, rn, stride_wuk, stride_wun, k_ok, n_ok, acc_u, UPCAST)
        acc_dh = mma_ab(DY, WD, rm, kk, rn, stride_dym, 1, stride_wdk, stride_wdn, m_ok, k_ok, n_ok, acc_dh, UPCAST)
    g = add_bias(acc_g, BG, rn, n_ok, HAS_BG)
    h, dg, du = swiglu_and_grads(acc_dh, g, add_bias(acc_u, BU, rn, n_ok, HAS_BU))
    mask = m_ok[:, None] & n_ok[None, :]
    store_tile(H_OUT, rm, rn, N, h, mask)
    store_tile(DG_OUT, rm, rn, N, dg, mask)
    store_tile(DU_OUT, rm, rn, N, du, mask)


swiglu_ffn_recompute_autotuned = triton.autotune(configs=triple_configs(), **TRIPLE_AUTOTUNE)(
    swiglu_ffn_recompute_kernel
)
