"""The LM head's Triton kernels: linear + cross-entropy without (N, V) logits (launched by
ckpt_ext/backends/triton/lm_head.py).

Forward, one kernel, no logits buffer at all: program (row block, V split) walks its V range in BLOCK_N tiles; each
tile z = hidden[rows] @ weight[tile]ᵀ (+ bias) is made in registers (fp32 accumulation) and folded into per-row
running statistics: m = max z, s = Σ exp(z - m) (online rescaling), z_y (the label's logit) and Σ z (label
smoothing). The (SPLITS, N) fp32 partials are combined on the host side with torch: lse = M + log Σ_k s_k exp(m_k - M),
loss = lse - (1-ε)·z_y - ε·Σz / V. V splits give a short N enough programs to fill the GPU.
Backward, per vocabulary chunk of c columns (ckpt_ext.lm_head.chunk_len(chunk_bytes, N, dtype, V)): one kernel
rebuilds each (tokens × columns) tile of logits and writes dz = g·(exp(z - lse) - ε/V) - g·(1-ε)·[col == y]
(g = dloss, 0 on ignored rows) in hidden.dtype into an (N, c) chunk buffer; cuBLAS then writes the chunk's rows
dweight[c0:c0+c] = dzᵀ @ hidden (complete in one GEMM, fp32-accumulated inside it) and adds dz @ W[c0:c0+c] into
dhidden, in fp32 across chunks (into dhidden itself for fp32; an (N, d) fp32 accumulator for 16-bit, none for a
single chunk). dbias sums dz in fp32.

Under TRITON_INTERPRET=1 only fp32 runs here (the interpreter's bf16 arithmetic is wrong); float64, empty inputs and
16-bit tensors under the interpreter take the reference math (in the launcher). Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .matmul_configs import interpreting
from .matmul_tiles import k_slice, load_bias, mma_ab, store_tile, tile_offsets

GROUP_M = 8
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): tensor-core tiles for 16-bit inputs; fp32 ieee dots run on FMA
# units and keep BLOCK_K-deep slices in registers (matmul_configs.SINGLE); the interpreter's smallest dot tile.
TILES_16BIT = (128, 128, 64, 8, 3)
FWD_TILES_16BIT = (128, 64, 64, 8, 3)  # the forward's online-softmax epilogue on 128×128 sat at 255 registers
TILES_FP32 = (64, 64, 16, 8, 2)
TILES_INTERPRETER = (16, 32, 32, 4, 1)


@triton.jit
def _logits_tile(X, W, B, rm, rn, m_ok, n_ok, K, stride_xm, stride_wn, stride_wk, HAS_BIAS: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):  # fmt: skip
    """fp32 (BLOCK_M, BLOCK_N) logits X[rm, :] @ W[rn, :]ᵀ (+ B[rn])."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk, k_ok = k_slice(k0, K, BLOCK_K)
        acc = mma_ab(X, W, rm, kk, rn, stride_xm, 1, stride_wk, stride_wn, m_ok, k_ok, n_ok, acc, UPCAST)
    if HAS_BIAS:
        acc += load_bias(B, rn, n_ok)
    return acc


@triton.jit
def linear_cross_entropy_fwd_kernel(
    X,  # (N, K) row stride stride_xm, unit column stride: hidden
    W,  # (V, K) strides (stride_wn, stride_wk): weight
    B,  # (V,) bias (unused when HAS_BIAS is False)
    Y,  # (N,) int64 labels (ignore_index never equals a column)
    M_PART,  # (SPLITS, N) fp32: row max of this split's logits
    S_PART,  # (SPLITS, N) fp32: Σ exp(z - max) over this split
    ZY_PART,  # (SPLITS, N) fp32: the label's logit when it falls in this split, else 0
    SZ_PART,  # (SPLITS, N) fp32: Σ z over this split
    N,
    V,
    K,
    stride_xm,
    stride_wn,
    stride_wk,
    v_per_split,  # columns per split, a multiple of BLOCK_N
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    split = tl.program_id(1)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < N
    rm = rm.to(tl.int64)
    y = tl.load(Y + rm, mask=m_ok, other=-1)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v0 = split * v_per_split
    v_end = tl.minimum(v0 + v_per_split, V)
    for n0 in range(v0, v_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < v_end
        z = _logits_tile(X, W, B, rm, rn, m_ok, n_ok, K, stride_xm, stride_wn, stride_wk, HAS_BIAS, UPCAST, BLOCK_M,
                         BLOCK_N, BLOCK_K)  # fmt: skip
        z = tl.where(n_ok[None, :], z, float("-inf"))  # every tile holds a valid column: m stays finite
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        zy += tl.sum(tl.where(rn[None, :] == y[:, None], z, 0.0), axis=1)
        sz += tl.sum(tl.where(n_ok[None, :], z, 0.0), axis=1)
    out = split * N + rm
    tl.store(M_PART + out, m, mask=m_ok)
    tl.store(S_PART + out, s, mask=m_ok)
    tl.store(ZY_PART + out, zy, mask=m_ok)
    tl.store(SZ_PART + out, sz, mask=m_ok)


@triton.jit
def linear_cross_entropy_dz_kernel(
    X,  # (R, K) row stride stride_xm, unit column stride: hidden
    W,  # (V, K) strides (stride_wn, stride_wk): this chunk's weight rows
    B,  # (V,) this chunk's bias (unused when HAS_BIAS is False)
    Y,  # (R,) int64 labels
    LSE,  # (R,) fp32 saved logsumexp
    G,  # (R,) fp32 dloss
    DZ,  # (R, V) contiguous, hidden.dtype: dz of the chunk
    R,
    V,  # columns of this vocabulary chunk
    K,
    stride_xm,
    stride_wn,
    stride_wk,
    col0,  # the chunk's first column in the whole vocabulary (labels count from 0 there)
    ignore_index,
    smooth,  # ε / (whole vocabulary)
    hit,  # 1 - ε
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    _, rm, rn, m_ok, n_ok = tile_offsets(R, V, BLOCK_M, BLOCK_N, GROUP_M)
    rm = rm.to(tl.int64)
    z = _logits_tile(X, W, B, rm, rn, m_ok, n_ok, K, stride_xm, stride_wn, stride_wk, HAS_BIAS, UPCAST, BLOCK_M,
                     BLOCK_N, BLOCK_K)  # fmt: skip
    y = tl.load(Y + rm, mask=m_ok, other=ignore_index)
    lse = tl.load(LSE + rm, mask=m_ok, other=0.0)
    g = tl.where(y == ignore_index, 0.0, tl.load(G + rm, mask=m_ok, other=0.0))
    dz = g[:, None] * (tl.exp(z - lse[:, None]) - smooth)
    dz -= tl.where(rn[None, :] + col0 == y[:, None], g[:, None] * hit, 0.0)
    store_tile(DZ, rm, rn, V, dz, m_ok[:, None] & n_ok[None, :])


# ------------------------------------------------------------------------------------------------------ tiles
def tiles(dtype: torch.dtype, forward: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for hidden of ``dtype`` (the forward or the dz kernel)."""
    if interpreting():
        return TILES_INTERPRETER
    if dtype == torch.float32:
        return TILES_FP32
    return FWD_TILES_16BIT if forward else TILES_16BIT


# ------------------------------------------------------------------------------------------------ compile lane
def compile_jobs(arch: int = 90):
    """(name, jit fn, signature, constexprs, options, attrs) for compile_check: both kernels, bf16 and fp16 with the
    tensor-core tiles and fp32 with the ieee tiles, bias on, weight's unit column stride as a constant; pointers and
    the row strides / K carry 16-divisibility (N and V do not: 50257, 128256 + odd token counts)."""
    for dt in ("bf16", "fp16", "fp32"):
        p, f32 = f"*{dt}", "*fp32"
        bm, bn, bk, warps, stages = TILES_FP32 if dt == "fp32" else FWD_TILES_16BIT
        const = dict(stride_wk=1, HAS_BIAS=True, UPCAST=dt == "fp32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        opts = {"num_warps": warps, "num_stages": stages}
        fwd_sig = dict(X=p, W=p, B=p, Y="*i64", M_PART=f32, S_PART=f32, ZY_PART=f32, SZ_PART=f32, N="i32", V="i32",
                       K="i32", stride_xm="i32", stride_wn="i32", stride_wk="constexpr", v_per_split="i32",
                       **{k: "constexpr" for k in const if k != "stride_wk"})  # fmt: skip
        yield (
            "linear_cross_entropy_fwd",
            linear_cross_entropy_fwd_kernel,
            fwd_sig,
            const,
            opts,
            _divisible(linear_cross_entropy_fwd_kernel, fwd_sig, ("K", "stride_xm", "stride_wn", "v_per_split")),
        )
        bm, bn, bk, warps, stages = TILES_FP32 if dt == "fp32" else TILES_16BIT
        dz_const = {**const, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M}
        opts = {"num_warps": warps, "num_stages": stages}
        dz_sig = dict(X=p, W=p, B=p, Y="*i64", LSE=f32, G=f32, DZ=p, R="i32", V="i32", K="i32", stride_xm="i32",
                      stride_wn="i32", stride_wk="constexpr", col0="i32", ignore_index="i32", smooth="fp32",
                      hit="fp32",
                      **{k: "constexpr" for k in dz_const if k != "stride_wk"})  # fmt: skip
        yield ("linear_cross_entropy_dz", linear_cross_entropy_dz_kernel, dz_sig, dz_const, opts,
               _divisible(linear_cross_entropy_dz_kernel, dz_sig, ("K", "stride_xm", "stride_wn")))  # fmt: skip


def _divisible(fn, signature: dict, ints: tuple) -> dict:
    names = [a for a, ty in signature.items() if ty.startswith("*")] + list(ints)
    return {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in names}
