"""Rotary position embedding of q and k in one launch (Hugging Face's rotate-half convention), and its adjoint.

For x (B, T, heads, dh) split in halves x1 = x[..., :dh/2], x2 = x[..., dh/2:], with c, s = cos, sin (B|1, T, dh):
    forward  (INVERSE=False): out = x·cos + rotate_half(x)·sin     rotate_half(x) = (-x2, x1)
             out1 = x1 c1 - x2 s1,   out2 = x2 c2 + x1 s2
    adjoint  (INVERSE=True):  out = x·cos + rotate_half_T(x·sin)   rotate_half_T(z) = (z2, -z1)
             out1 = x1 c1 + x2 s2,   out2 = x2 c2 - x1 s1          (the VJP: dq, dk from dq_rot, dk_rot)
Grid (B·T,): one program per (b, t) position loads its cos/sin row once and rotates every q head and then every k
head, BLOCK_H heads per step, each a (BLOCK_H, BLOCK_HALF) tile of each half. q, k are read through their
(b, t, head) strides (unit last stride, e.g. views of a packed qkv projection); cos/sin through (b, t) strides
(stride_cb = 0 broadcasts a batch-1 table). fp32 math; outputs contiguous in q.dtype / k.dtype.
"""

import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    X, OUT, x_base, out_base, n_heads, stride_xh, c1, c2, s1, s2, half, INVERSE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Rotate heads 0..n_heads-1 of one position: x at X + x_base + head·stride_xh, out contiguous (heads, 2·half)."""
    cols = tl.arange(0, BLOCK_HALF)
    c_ok = cols < half
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < n_heads)[:, None] & c_ok[None, :]  # (BLOCK_H, BLOCK_HALF)
        src = X + x_base + heads[:, None] * stride_xh + cols[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        if INVERSE:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        dst = OUT + out_base + heads[:, None] * (2 * half) + cols[None, :]
        tl.store(dst, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(dst + half, o2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def rope_kernel(
    Q,  # (B, T, hq, dh) strides (stride_qb, stride_qt, stride_qh, 1)
    K,  # (B, T, hk, dh) strides (stride_kb, stride_kt, stride_kh, 1)
    COS,  # (B|1, T, dh) strides (stride_cb, stride_ct, 1); stride_cb = 0 for a batch-1 table
    SIN,  # (B|1, T, dh) same strides as COS
    Q_OUT,  # (B, T, hq, dh) contiguous, q.dtype
    K_OUT,  # (B, T, hk, dh) contiguous, k.dtype
    T,
    hq,
    hk,
    half,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_cb,
    stride_ct,
    INVERSE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pos = tl.program_id(0).to(tl.int64)
    b = pos // T
    t = pos % T
    cols = tl.arange(0, BLOCK_HALF)
    c_ok = cols < half
    cs = b * stride_cb + t * stride_ct + cols
    c1 = tl.load(COS + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]  # (1, BLOCK_HALF)
    c2 = tl.load(COS + cs + half, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + cs + half, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q, Q_OUT, b * stride_qb + t * stride_qt, pos * hq * 2 * half, hq, stride_qh, c1, c2, s1, s2, half,
                  INVERSE, BLOCK_H, BLOCK_HALF)  # fmt: skip
    _rotate_heads(K, K_OUT, b * stride_kb + t * stride_kt, pos * hk * 2 * half, hk, stride_kh, c1, c2, s1, s2, half,
                  INVERSE, BLOCK_H, BLOCK_HALF)  # fmt: skip
