"""Launchers of ckpt_ext/kernels/flash_attention.py with the graph ops' signatures (backend "triton"): ``IMPLS`` maps
gqa_attention_fwd / _bwd and the packed-qkv attention_fwd / _bwd (q, k, v views of qkv, scale 1/sqrt(dh)).

Every mask and dropout case runs the flash kernels (on CUDA and under TRITON_INTERPRET=1); inputs they do not cover
(float64, head dim > 256, an empty T or S, an integer-free but non-kernel mask dtype such as float64) run
aten_attention's routes, so every call returns the reference's result. q, k, v are read through their strides
(copied only if the last stride is not 1); the mask through its broadcast strides (bool viewed as uint8, no copy).
segment_ids (B, S) go to the kernels as they are (int32 or int64, made contiguous) with their ranges for tile
skipping (ckpt_ext.segments.key_ranges for the forward and dq kernels, query_ranges for the dk/dv kernel: (B, S)
int32 pairs built on the device without a sync).
window w > 0 goes to the kernels as an int (WINDOW flag): they hide keys with |t - s| > w and skip the tiles outside
the band; no (T, S) mask is built.
Tiles: ckpt_ext/kernels/flash_attention_tiles.gpu_tiles (one config per kernel and head dim; 16×16 tiles under the
interpreter).
"""

from __future__ import annotations

import functools

import torch

from ... import reference, segments
from ...kernels.flash_attention import gqa_bwd_dkdv_kernel, gqa_bwd_dq_kernel, gqa_fwd_kernel
from ...kernels.flash_attention_tiles import gpu_tiles
from ...kernels.matmul_configs import interpreting
from ...reference_attention import check_gqa_args, empty_threshold, mask4, packed_bwd, packed_fwd
from .. import aten_attention
from .launch_utils import cdiv

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _arch(device) -> int:
    """sm version (90 for H100/H200) of a CUDA device, 90 elsewhere (the interpreter ignores it)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _covered(q, k, attn_mask) -> bool:
    mask_ok = attn_mask is None or attn_mask.dtype in (torch.bool, *KERNEL_DTYPES)
    return q.dtype in KERNEL_DTYPES and q.shape[-1] <= MAX_HEAD_DIM and q.shape[1] > 0 and k.shape[1] > 0 and mask_ok


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _unit_key_stride(m4, s: int):
    """The (B|1, h|1, T|1, S|1) mask with key stride 1, which the kernels assume (they take no key stride): as is when
    it already has it (or S == 1), else a copy over its own dims with the key dim materialized: (B|1, h|1, T|1, S),
    never expanded over the dims it broadcasts."""
    if s == 1 or (m4.shape[-1] == s and m4.stride(-1) == 1):
        return m4
    return m4.expand(*m4.shape[:3], s).contiguous()


def _as_int32(v: int) -> int:
    return v - (1 << 32) if v >= (1 << 31) else v


def _segments(segment_ids):
    """The ids as the kernels read them: contiguous, an id equal to its dtype's minimum read as 0 (padding: what the
    rule says of it, since its |id| is no positive id; tl.abs would wrap it)."""
    seg = segment_ids.contiguous()
    return seg.masked_fill(seg == torch.iinfo(seg.dtype).min, 0)  # (B, S), no sync


def _common(q, k, v, causal, dropout_p, seed, attn_mask, segment_ids, window=0, backward=False):
    """Kernel arguments shared by the three kernels: mask tensor + strides, segment ids + tile ranges (the rows' key
    ranges; with ``backward`` also the keys' query ranges for the dk/dv kernel), shape, dropout, constexpr flags."""
    b, t, h, _ = q.shape
    s = k.shape[1]
    if attn_mask is None:
        mask, kind, mstrides = q, 0, (0, 0, 0)
    else:
        mask = _unit_key_stride(mask4(attn_mask), s).expand(b, h, t, s)  # broadcast strides, no copy
        kind = 1 if mask.dtype == torch.bool else 2
        mask = mask.view(torch.uint8) if kind == 1 else mask
        mstrides = mask.stride()[:3]
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mstrides)
    drop = (_as_int32(reference.seed_key(seed)), reference.dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            window)  # fmt: skip
    flags = dict(
        CAUSAL=causal,
        MASK_KIND=kind,
        HAS_SEG=segment_ids is not None,
        DROPOUT=dropout_p > 0.0,
        UPCAST=interpreting() or q.dtype == torch.float32,
        WINDOW=window > 0,
    )
    # (MASK, SEG, RSTART, REND) per kernel: the rows' key ranges (forward, dq), the keys' query ranges (dk/dv); q in
    # the id slots (unread) without ids
    masks = {"rows": (mask, q, q, q), "keys": (mask, q, q, q)}
    if segment_ids is not None:
        seg = _segments(segment_ids)
        masks["rows"] = (mask, seg, *segments.key_ranges(seg))
        if backward:
            masks["keys"] = (mask, seg, *segments.query_ranges(seg))
    return masks, strides, (t, s, h, h // k.shape[2], q.shape[-1]), drop, flags


def gqa_attention_fwd(q, k, v, causal, dropout_p, seed, attn_mask, scale, segment_ids=None, window=0):
    check_gqa_args(q, k, v, causal, dropout_p, attn_mask, scale, segment_ids=segment_ids, window=window)
    if not _covered(q, k, attn_mask):
        return aten_attention.gqa_attention_fwd(q, k, v, causal, dropout_p, seed, attn_mask, scale, segment_ids, window)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, t, h, dh = q.shape
    masks, strides, shape, drop, flags = _common(q, k, v, causal, dropout_p, seed, attn_mask, segment_ids, window)
    out = torch.empty((b, t, h, dh), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    tiles, opts = gpu_tiles("gqa_fwd", dh, _arch(q.device), q.dtype)
    grid = (cdiv(t, tiles["BLOCK_M"]), b * h)
    gqa_fwd_kernel[grid](q, k, v, *masks["rows"], out, lse, *strides, *shape, scale, empty_threshold(attn_mask), *drop,
                         **flags, **tiles, **opts)  # fmt: skip
    return out, lse


def gqa_attention_bwd(dout, q, k, v, out, lse, causal, dropout_p, seed, attn_mask, scale, segment_ids=None, window=0):
    check_gqa_args(
        q, k, v, causal, dropout_p, attn_mask, scale, op="gqa_attention_bwd", segment_ids=segment_ids, window=window
    )
    if not _covered(q, k, attn_mask) or lse.dtype != torch.float32:
        return aten_attention.gqa_attention_bwd(
            dout, q, k, v, out, lse, causal, dropout_p, seed, attn_mask, scale, segment_ids, window
        )
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    b, t, h, dh = q.shape
    s, hk = k.shape[1], k.shape[2]
    masks, strides, shape, drop, flags = _common(q, k, v, causal, dropout_p, seed, attn_mask, segment_ids, window, True)
    delta = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    dq = torch.empty((b, t, h, dh), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, s, hk, dh), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, s, hk, dh), dtype=v.dtype, device=q.device)
    tiles, opts = gpu_tiles("gqa_bwd_dq", dh, _arch(q.device), q.dtype)
    gqa_bwd_dq_kernel[(cdiv(t, tiles["BLOCK_M"]), b * h)](
        dout, q, k, v, out, lse, delta, dq, *masks["rows"], *strides, *shape, scale, *drop, **flags, **tiles, **opts
    )
    tiles, opts = gpu_tiles("gqa_bwd_dkdv", dh, _arch(q.device), q.dtype)
    gqa_bwd_dkdv_kernel[(cdiv(s, tiles["BLOCK_N"]), b * hk)](
        dout, q, k, v, lse, delta, dk, dv, *masks["keys"], *strides, *shape, scale, *drop, **flags, **tiles, **opts
    )
    return dq, dk, dv


attention_fwd = functools.partial(packed_fwd, gqa_attention_fwd)
attention_bwd = functools.partial(packed_bwd, gqa_attention_bwd)


IMPLS = {
    "gqa_attention_fwd": gqa_attention_fwd,
    "gqa_attention_bwd": gqa_attention_bwd,
    "attention_fwd": attention_fwd,
    "attention_bwd": attention_bwd,
}
