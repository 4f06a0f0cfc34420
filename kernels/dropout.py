"""Dropout with a counter-based hash mask, fused with the residual add: out = x · keep / (1 - p) (+ residual).

The mask is bit-identical to ckpt_ext.reference.dropout_keep_mask: with key = fmix32((seed ^ 0x9E3779B9) mod 2³²)
computed on the host, element i (flat row-major index, < 2³²) is kept iff fmix32(fmix32(i ^ key) + key) >> 8 ≥
floor(p · 2²⁴), where fmix32 is MurmurHash3's 32-bit finalizer in wrapping uint32 arithmetic.
x, residual, out: (numel,) flat contiguous; one program per BLOCK elements; fp32 math; out never aliases an input.
"""

import triton
import triton.language as tl


@triton.jit
def fmix32(h):
    """MurmurHash3 finalizer on a uint32 tile."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def apply_dropout(y, flat, key, threshold, scale):
    """y · keep / (1 - p) for fp32 y at flat indices `flat` (int64 tile, < 2³²): the hash mask described above."""
    k = key.to(tl.uint32, bitcast=True)
    h = fmix32(fmix32(flat.to(tl.uint32) ^ k) + k)
    keep = (h >> 8).to(tl.int32) >= threshold
    return tl.where(keep, y * scale, 0.0)


@triton.jit(do_not_specialize=["key", "threshold"])
def dropout_add_kernel(
    X,  # (numel,) contiguous: branch to drop
    RES,  # (numel,) contiguous: residual (read only when HAS_RES)
    OUT,  # (numel,) contiguous, result_type(x, residual)
    numel,
    key,  # int32 bit pattern of the uint32 per-seed key
    threshold,  # floor(p · 2²⁴)
    scale,  # 1 / (1 - p)
    HAS_RES: tl.constexpr,
    APPLY_DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    y = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if APPLY_DROPOUT:
        y = apply_dropout(y, offs, key, threshold, scale)
    if HAS_RES:
        y += tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)
