"""The cpp/cuda backends' attention: aten's fused kernels where they fit, bounded-memory tiled aten math otherwise.

Math, masks, the empty-row rule and the dropout index are reference_attention.py's. Routes (``_route_gqa``):
- ``cpu_gqa``: no mask or dropout (segment ids allowed), fp32 CPU tensors with a contiguous last dim, S <=
  CPU_GQA_MAX_KEYS: ckpt_ext._C's own kernels (csrc/cpu/attention_cpu.cpp, ops
  ``ckpt_ext::cpu_gqa_attention_fwd/_bwd``): each work item stacks one kv head's G query heads over a tile of rows, so
  every product is one BLAS sgemm against that kv head's keys (no repeat_kv), with an exact per-row softmax over the
  keys the tile's rows may see (with ids, the span of their segments: packed sequences skip each other's keys; never a
  (B, T, S) mask). 1.3-1.9x aten's CPU flash kernel (causal), 3.2-4.0x on packed sequences (``python -m
  bench.cpu_attention``).
- ``cpu_flash``: no dropout, CPU, and any other dtype or shape without a mask, or a mask the kernel reads exactly (bool,
  or the query's float dtype): aten's flash kernel for CPU (``_scaled_dot_product_flash_attention_for_cpu`` and its
  backward), one call for all heads: it takes GQA natively (h query heads against hk kv heads, no repeat_kv copy; dk/dv
  come back summed over each group) and reads a mask broadcast over batch and heads without expanding it. Its scratch is
  per-thread tiles, never (B, h, T, S). A mask is handed over as an additive tensor in q's dtype with -inf wherever a
  key is invisible (bool False, or a float value at or below empty_threshold: such keys already get probability 0 in the
  reference); a row with no visible key then comes back as zeros with zero gradients, and its lse is set to -inf here
  (the row is found from the mask, causality included; the kernel itself reports 0). Without a mask and with causal S ==
  T no row is empty.
- ``cuda_flash``: no mask, no dropout, CUDA, fp16/bf16, h == hk, dh % 8 == 0 and <= 256, sm_80+: aten's
  FlashAttention-2 on (B, h, T, dh) views; its logsumexp is (B, h, T) fp32 in natural log.
- ``cpu_math`` (any device, every mask and dropout): tiles over kv groups × BLOCK_Q query rows. A tile holds the
  scores of the group's g heads for BLOCK_Q queries against every key they may see (all S, or keys up to the tile's
  last row when causal), (B, g, BLOCK_Q, S) at most, in fp32 (fp64 for fp64): the softmax is exact per row without
  rescaling, and peak scratch is a few tiles whatever T: never a (B, h, T, S) tensor. Forward: S = (scale · q) kᵀ by
  one bmm over the g heads' stacked rows (baddbmm with an additive mask's tile, a bool mask filled in), causal -inf on
  the diagonal block only, P by aten's fused softmax, lse = rowmax - log max P, empty rows zeroed with lse = -inf.
  Backward rebuilds P = exp(S - lse) per tile (0 where lse = -inf), dv_j and dk_j accumulate over the tiles and the
  group's heads inside the bmms, dS by aten's softmax backward. Dropout multiplies a tile in place by the reference's
  hash mask at the tile's flat (B, h, T, S) indices, bit for bit: one pass of ckpt_ext._C's
  attention_tile_dropout_kernel (CPU and CUDA; ~4x faster than the fallback), else wrapping int32 tensor arithmetic
  (logical shifts by masking; ~4x cheaper than the reference's int64 emulation).
- ``reference``: empty T or S.
window w > 0 (query t sees keys |t - s| <= w only): never a (T, S) mask and never aten's flash kernels (they would need
one). ``cpu_gqa`` takes it as an argument (each tile reads keys t0 - w .. t1 - 1 + w only); every other case runs
``cpu_math``, whose tiles then cover keys max(0, t0 - w) .. min(S, t1 + w) (hidden beyond each row's band by a
(tq, n) tile mask), so a local layer costs O(T·w) and its scratch is (B, g, BLOCK_Q, BLOCK_Q + 2w) at most; dropout
on such a tile takes the int32 emulation at the tile's key offset.
segment_ids (B, S) (key padding / packed sequences, see ckpt_ext/segments.py): ``cpu_math`` builds each tile's
(B, tq, n) visibility from the ids of its rows and keys (never a (B, h, T, S) or (B, T, S) tensor) and skips nothing;
``cpu_gqa`` reads them in the kernel (above); ``cpu_flash`` (ids with an attn_mask, or not fp32) hands them over as
the additive (B, 1, T, S) -inf mask (segments.visibility, combined with attn_mask when both are given), with the empty
rows found from it; ``cuda_flash`` is never taken with them.
The packed-qkv ops (attention_fwd/_bwd) call the same routes on q, k, v views of qkv (h == hk, scale 1/sqrt(dh)).
"""

from __future__ import annotations

import functools

import torch

from .. import reference, reference_attention, segments
from ..reference_attention import empty_threshold, mask4, packed_bwd, packed_fwd, split_heads
from .extension import built, cuda_built

BLOCK_Q = 64  # query rows per cpu_math tile
CPU_GQA_MAX_KEYS = 8192  # longer key sequences take aten's flash kernel (cpu_gqa's tiles hold every visible key)


def _cuda_flash_fits(q, k) -> bool:
    dh = q.shape[-1]
    return (
        q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[2] == k.shape[2]
        and dh % 8 == 0
        and dh <= 256
        and torch.cuda.get_device_capability(q.device)[0] >= 8
        and torch.backends.cuda.is_flash_attention_available()
    )


@functools.cache
def _cpu_gqa_available() -> bool:
    """Whether ckpt_ext._C has the cpu_gqa ops (with their window argument) and found its BLAS (an older build lacks
    them; no build, no _C)."""
    if not built():
        return False
    ops = torch.ops.ckpt_ext
    if not (hasattr(ops, "cpu_gqa_available") and hasattr(ops, "cpu_gqa_attention_bwd")):
        return False
    args = [a.name for a in ops.cpu_gqa_attention_bwd.default._schema.arguments]
    return "window" in args and ops.cpu_gqa_available()


def _cpu_gqa_fits(q, k, v) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.float32
        and k.shape[1] <= CPU_GQA_MAX_KEYS
        and q.shape[-1] > 0
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and _cpu_gqa_available()
    )


def _route_gqa(q, k, v, dropout_p, attn_mask, segment_ids=None, window=0) -> str:
    if q.shape[1] == 0 or k.shape[1] == 0:
        return "reference"
    if dropout_p == 0.0:
        if attn_mask is None and _cpu_gqa_fits(q, k, v):
            return "cpu_gqa"
        if window > 0:
            return "cpu_math"
        if q.device.type == "cpu" and (attn_mask is None or attn_mask.dtype in (torch.bool, q.dtype)):
            return "cpu_flash"
        no_mask = attn_mask is None and segment_ids is None
        if no_mask and q.device.type == "cuda" and _cuda_flash_fits(q, k):
            return "cuda_flash"
    return "cpu_math"


def _route(qkv, n_heads, dropout_p, attn_mask) -> str:
    """The route the packed op takes for qkv (B, T, 3d)."""
    q, k, v = split_heads(qkv, n_heads)
    return _route_gqa(q, k, v, dropout_p, attn_mask)


# ------------------------------------------------------------------------------------------------ grouped-query
def gqa_attention_fwd(q, k, v, causal, dropout_p, seed, attn_mask, scale, segment_ids=None, window=0):
    reference_attention.check_gqa_args(
        q, k, v, causal, dropout_p, attn_mask, scale, segment_ids=segment_ids, window=window
    )
    route = _route_gqa(q, k, v, dropout_p, attn_mask, segment_ids, window)
    if route == "reference":
        return reference_attention.gqa_attention_fwd(
            q, k, v, causal, dropout_p, seed, attn_mask, scale, segment_ids, window
        )
    if route == "cpu_gqa":
        return torch.ops.ckpt_ext.cpu_gqa_attention_fwd(q, k, v, causal, scale, segment_ids, window)
    if route == "cpu_math":
        return _math_fwd(q, k, v, causal, dropout_p, seed, attn_mask, scale, segment_ids, window)
    b, t, h, dh = q.shape
    if route == "cuda_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, False, scale=scale
        )[:2]
        return out.transpose(1, 2).contiguous(), lse.contiguous()
    flash_mask, empty = _flash_mask(attn_mask, q, t, k.shape[1], causal, segment_ids)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, attn_mask=flash_mask, scale=scale
    )  # out (B, h, T, dh) laid out like q.transpose(1, 2); lse (B, h, T)
    lse_dtype = reference.compute_dtype(q)
    lse = (lse if lse.dtype == lse_dtype else lse.to(lse_dtype)).contiguous()  # (B, h, T), strided like q
    if empty is not None:
        lse.masked_fill_(empty, float("-inf"))
    return out.transpose(1, 2).contiguous(), lse


def gqa_attention_bwd(dout, q, k, v, out, lse, causal, dropout_p, seed, attn_mask, scale, segment_ids=None, window=0):
    reference_attention.check_gqa_args(
        q, k, v, causal, dropout_p, attn_mask, scale, op="gqa_attention_bwd", segment_ids=segment_ids, window=window
    )
    route = _route_gqa(q, k, v, dropout_p, attn_mask, segment_ids, window)
    if route == "reference":
        return reference_attention.gqa_attention_bwd(
            dout, q, k, v, out, lse, causal, dropout_p, seed, attn_mask, scale, segment_ids, window
        )
    if route == "cpu_gqa":
        lse32 = lse if lse.dtype == torch.float32 else lse.float()
        return torch.ops.ckpt_ext.cpu_gqa_attention_bwd(dout, q, k, v, out, lse32, causal, scale, segment_ids, window)
    if route == "cpu_math":
        return _math_bwd(dout, q, k, v, lse, causal, dropout_p, seed, attn_mask, scale, segment_ids, window)
    b, t, h, dh = q.shape
    if route == "cuda_flash":
        rng_state = torch.empty((2,), dtype=torch.uint64, device=q.device)
        unused = torch.empty((), dtype=torch.uint64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            *(x.transpose(1, 2) for x in (dout, q, k, v, out)), lse.to(torch.float32), None, None,
            t, k.shape[1], 0.0, causal, rng_state, unused, scale=scale,
        )  # fmt: skip
        return tuple(x.transpose(1, 2).contiguous() for x in (dq, dk, dv))
    flash_mask, empty = _flash_mask(attn_mask, q, t, k.shape[1], causal, segment_ids)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
        lse if empty is None else lse.masked_fill(empty, 0.0), 0.0, causal, attn_mask=flash_mask, scale=scale,
    )  # fmt: skip
    return tuple(x.transpose(1, 2).contiguous() for x in (dq, dk, dv))


def _flash_mask(attn_mask, q, t, s, causal, segment_ids=None):
    """attn_mask and segment_ids as the additive (B|1, h|1, T|1, S) tensor in q's dtype that aten's CPU flash kernel
    reads (-inf where a key is invisible), and the (B|1, h|1, T) rows with no visible key (None when there is none);
    (None, None) without either. segment_ids add their (B, 1, T, S) visibility."""
    if attn_mask is None and segment_ids is None:
        return None, None
    m4 = segments.with_mask(mask4(attn_mask), segment_ids)  # (B|1, h|1, T|1, S|1)
    if m4.dtype == torch.bool:
        visible = m4
        flash_mask = torch.zeros(m4.shape, dtype=q.dtype, device=q.device).masked_fill_(~m4, float("-inf"))
    else:
        visible = m4 > empty_threshold(m4)
        flash_mask = m4.masked_fill(~visible, float("-inf"))
    seen = visible.expand(*visible.shape[:2], t, s)
    if causal:
        seen = seen & torch.ones(t, s, dtype=torch.bool, device=q.device).tril_()
    empty = ~seen.any(dim=-1)  # (B|1, h|1, T)
    return flash_mask, (empty if bool(empty.any()) else None)


# ------------------------------------------------------------------------------------------- tiled aten math
def _c32(c: int) -> int:
    return c - (1 << 32) if c >= (1 << 31) else c


def _fmix32_i32_(h):
    """MurmurHash3's finalizer in place on int32 tensors of uint32 bit patterns (wrapping multiply, logical shifts)."""
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
        h ^= (h >> shift).bitwise_and_((1 << (32 - shift)) - 1)
        if mult is not None:
            h *= _c32(mult)
    return h


def _tile_keep(shape, j, g, t0, t1, n, dropout_p, seed, device, lo=0):
    """Keep-mask (B, g, tq, n) of a tile: the hash at flat (B, h, T, S) index ((b·h + j·g + i)·T + t)·S + s mod 2³²
    for keys lo <= s < lo + n."""
    b, h, t, s = shape
    ar = lambda k, start=0: torch.arange(start, start + k, dtype=torch.int64, device=device)  # noqa: E731
    rows = ((ar(b)[:, None] * h + j * g + ar(g)[None, :]) * t)[:, :, None] + ar(t1 - t0, t0)  # (B, g, tq)
    hsh = (rows * s).to(torch.int32)[..., None] + ar(n, lo).to(torch.int32)  # (B, g, tq, n), wraps mod 2³²
    key = _c32(reference.seed_key(seed))
    hsh ^= key
    _fmix32_i32_(hsh)
    hsh += key
    _fmix32_i32_(hsh)
    return (hsh >> 8).bitwise_and_(0xFFFFFF) >= reference.dropout_threshold(dropout_p)


def _drop_(x, keep, dropout_p):
    """x ∘ keep / (1 - p) in place (x itself without dropout)."""
    return x if keep is None else x.mul_(keep).mul_(1.0 / (1.0 - dropout_p))


@functools.cache
def _tile_dropout_kernel(device_type: str):
    """ckpt_ext._C's attention_tile_dropout_kernel for ``device_type`` (one pass, the hash in registers), or None when
    the extension lacks it (not built, CPU-only build on CUDA tensors, or built before the op existed)."""
    if not built() or (device_type == "cuda" and not cuda_built()):
        return None
    if device_type not in ("cpu", "cuda"):
        return None
    return getattr(torch.ops.ckpt_ext, "attention_tile_dropout_kernel", None)


def _tile_dropout_(x, shape, j, g, t0, t1, n, dropout_p, seed, lo=0):
    """The tile x (B, g, tq, n) (contiguous, cdt; keys lo..lo+n-1) ∘ keep / (1 - p) in place, keep the reference hash
    at the tile's flat (B, h, T, S) indices: the extension's kernel when there is one and lo == 0 (it numbers keys from
    0), else _tile_keep's int32 emulation; x without dropout."""
    if dropout_p == 0.0:
        return x
    kernel = _tile_dropout_kernel(x.device.type)
    if kernel is not None and lo == 0:
        _, h, t, s = shape
        kernel(x, h, t, s, j * g, t0, dropout_p, seed)
        return x
    return _drop_(x, _tile_keep(shape, j, g, t0, t1, n, dropout_p, seed, x.device, lo), dropout_p)


def _tile_scores(q, k, j, g, t0, t1, lo, hi, causal, m4, scale, cdt, seg=None, window=0):
    """scale · q tile (B, g·tq, dh) and S = scale · q kᵀ + mask (B, g, tq, n) in cdt for kv group j, query rows
    t0:t1, keys lo:hi (n = hi - lo; hi = t1 when causal: the keys past the tile's last row are never visible, so never
    computed; lo = t0 - window with a window); -inf where the segment ids seg (B, S) hide a key and outside the
    window."""
    b, tq, n = q.shape[0], t1 - t0, hi - lo
    qt = q[:, t0:t1, j * g : (j + 1) * g].transpose(1, 2).to(cdt).reshape(b, g * tq, -1) * scale
    kt = k[:, lo:hi, j].to(cdt).transpose(1, 2)  # (B, dh, n)
    mt = None
    if m4 is not None:
        mt = m4[:, j * g : (j + 1) * g] if m4.shape[1] > 1 else m4
        mt = mt[:, :, t0:t1] if mt.shape[2] > 1 else mt
        mt = mt[..., lo:hi] if mt.shape[3] > 1 else mt  # (B|1, g|1, tq|1, n|1)
    if mt is not None and mt.dtype != torch.bool:
        bias = mt.to(cdt).expand(mt.shape[0], g, tq, n).reshape(mt.shape[0], g * tq, n)
        s = torch.baddbmm(bias, qt, kt).view(b, g, tq, n)
    else:
        s = torch.bmm(qt, kt).view(b, g, tq, n)
        if mt is not None:
            s.masked_fill_(~mt, float("-inf"))
    if seg is not None:
        rows, keys = seg[:, t0:t1, None], seg[:, None, lo:hi]  # (B, tq, 1), (B, 1, n)
        s.masked_fill_(((keys <= 0) | (rows.abs() != keys))[:, None], float("-inf"))  # (B, 1, tq, n)
    if causal:  # the diagonal block, keys t0:t1
        above = torch.ones(tq, tq, dtype=torch.bool, device=s.device).triu_(1)
        s[..., t0 - lo : t1 - lo].masked_fill_(above, float("-inf"))
    if window > 0:  # (tq, n): the tile's band, never (T, S)
        dist = torch.arange(t0, t1, device=s.device)[:, None] - torch.arange(lo, hi, device=s.device)[None, :]
        s.masked_fill_(dist.abs_() > window, float("-inf"))
    return qt, s


def _tiles(q, k, causal, window=0):
    """(kv head j, group size g, its query heads, rows t0:t1, visible keys lo:hi) for each tile."""
    b, t, h, _ = q.shape
    g, s = h // k.shape[2], k.shape[1]
    for j in range(k.shape[2]):
        for t0 in range(0, t, BLOCK_Q):
            t1 = min(t, t0 + BLOCK_Q)
            hi = t1 if causal else s
            lo = 0
            if window > 0:
                lo, hi = max(0, t0 - window), min(hi, t1 + window)
            yield j, g, slice(j * g, (j + 1) * g), t0, t1, lo, hi


def _math_fwd(q, k, v, causal, dropout_p, seed, attn_mask, scale, segment_ids=None, window=0):
    b, t, h, dh = q.shape
    s_len = k.shape[1]
    cdt = reference.compute_dtype(q)
    m4, thr = mask4(attn_mask), empty_threshold(attn_mask)
    out = q.new_empty((b, t, h, dh))
    lse = q.new_empty((b, h, t), dtype=cdt)
    for j, g, heads, t0, t1, lo, hi in _tiles(q, k, causal, window):
        n = hi - lo
        _, s = _tile_scores(q, k, j, g, t0, t1, lo, hi, causal, m4, scale, cdt, segment_ids, window)  # (B, g, tq, n)
        row_max = s.amax(dim=-1, keepdim=True)  # (B, g, tq, 1)
        p = torch.softmax(s, dim=-1)
        lse_t = row_max - p.amax(dim=-1, keepdim=True).log_()  # max P = 1 / Σ exp(S - max S)
        if m4 is not None or segment_ids is not None:  # only a mask or ids can leave a row without a visible key
            empty = row_max <= thr
            p.masked_fill_(empty, 0.0)
            lse_t.masked_fill_(empty, float("-inf"))
        lse[:, heads, t0:t1] = lse_t.squeeze(-1)
        p = _tile_dropout_(p, (b, h, t, s_len), j, g, t0, t1, n, dropout_p, seed, lo)
        o = torch.bmm(p.view(b, -1, n), v[:, lo:hi, j].to(cdt))  # (B, g·tq, dh)
        out[:, t0:t1, heads] = o.view(b, g, t1 - t0, dh).transpose(1, 2)
    return out, lse


def _math_bwd(dout, q, k, v, lse, causal, dropout_p, seed, attn_mask, scale, segment_ids=None, window=0):
    b, t, h, dh = q.shape
    s_len = k.shape[1]
    cdt = reference.compute_dtype(q)
    m4 = mask4(attn_mask)
    any_empty = bool(torch.isneginf(lse).any())
    dq = q.new_empty((b, t, h, dh))
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    for j, g, heads, t0, t1, lo, hi in _tiles(q, k, causal, window):
        tq, n = t1 - t0, hi - lo
        qt, s = _tile_scores(q, k, j, g, t0, t1, lo, hi, causal, m4, scale, cdt, segment_ids, window)  # qt = scale·q
        lse_t = lse[:, heads, t0:t1].to(cdt)[..., None]  # (B, g, tq, 1)
        p = s.sub_(lse_t).exp_()  # (B, g, tq, n)
        if any_empty:
            p.masked_fill_(torch.isneginf(lse_t), 0.0)
        tile = ((b, h, t, s_len), j, g, t0, t1, n, dropout_p, seed, lo)
        do = dout[:, t0:t1, heads].transpose(1, 2).to(cdt).reshape(b, g * tq, dh)
        pd = p if dropout_p == 0.0 else _tile_dropout_(p.clone(), *tile)
        dv[:, lo:hi, j] += torch.bmm(pd.view(b, g * tq, n).transpose(1, 2), do)
        dp = _tile_dropout_(torch.bmm(do, v[:, lo:hi, j].to(cdt).transpose(1, 2)).view(b, g, tq, n), *tile)
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype).view(b, g * tq, n)  # P ∘ (dP - rowsum(P ∘ dP))
        dq[:, t0:t1, heads] = torch.bmm(ds, k[:, lo:hi, j].to(cdt)).mul_(scale).view(b, g, tq, dh).transpose(1, 2)
        dk[:, lo:hi, j] += torch.bmm(ds.transpose(1, 2), qt)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------------------------ packed qkv
attention_fwd = functools.partial(packed_fwd, gqa_attention_fwd)
attention_bwd = functools.partial(packed_bwd, gqa_attention_bwd)
