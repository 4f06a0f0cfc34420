"""Reference math of ``ckpt_ext::gqa_attention_fwd`` / ``gqa_attention_bwd`` (grouped-query softmax attention) and of
``attention_fwd`` / ``attention_bwd`` (packed qkv, the same math on its views: ``packed_fwd`` / ``packed_bwd`` serve
every backend).

q (B, T, h, dh), k and v (B, S, hk, dh), h % hk == 0, g = h // hk: query head i reads kv head j = i // g (k and v are
never repeated). One query head at a time, on one (B, T, S) score tile; no (B, h, T, S) tensor is ever built:

    S_i  = scale · q_i k_jᵀ + bias_i      bias_i: the additive float mask, or -inf where a bool keep-mask is False,
                                          -inf where segment_ids hide the key, -inf above the diagonal when
                                          causal (causal requires S == T), and -inf where |t - s| > window when
                                          window > 0 (a sliding window; requires S == T)
    m    = rowmax S_i                     a row is empty (no visible key) iff m <= threshold: -inf without a mask or
                                          with a bool one, finfo(mask.dtype).min / 2 with a float mask, so rows
                                          emptied by -inf and by finfo.min (Hugging Face's padding) are both found
    lse  = m + log Σ exp(S_i - m)         -inf for empty rows
    P    = exp(S_i - lse)                 0 for empty rows
    out_i = (P ∘ keep / (1 - p)) v_j      keep: the ckpt_ext hash mask at the flat (B, h, T, S) index
                                          ((b·h + i)·T + t)·S + s (taken mod 2³², as every kernel does)
Backward (P rebuilt from lse; empty rows have lse = -inf, so P = 0 and their gradients are 0):
    dP = (dO_i v_jᵀ) ∘ keep / (1 - p),  dS = P ∘ (dP - rowsum(P ∘ dP))
    dq_i = scale · dS k_j,  dk_j += scale · dSᵀ q_i,  dv_j += (P ∘ keep / (1 - p))ᵀ dO_i   (summed over j's g heads)
Compute in fp32 (fp64 for fp64 inputs); out (B, T, h, dh) in q.dtype, lse (B, h, T) in the compute dtype, dq/dk/dv
in q/k/v's dtypes, all fresh contiguous tensors. ``check_gqa_args`` is the argument check every backend runs.

segment_ids (B, S) int32/int64, optional (needs T == S): query row t sees key s iff seg[b, s] > 0 and |seg[b, t]| ==
seg[b, s] (0 = padding; -s = a padded key of sequence s whose row still sees sequence s, an encoder's key mask;
ckpt_ext/segments.py builds them from lengths, keep / key masks, cu_seqlens or position ids). The reference applies them
as their (B, 1, T, S) bool visibility (segments.visibility), on top of attn_mask when both are given (a key must pass
both). Dropout indices do not depend on the mask, so the hash mask is the same whether visibility comes from segment_ids
or from the equivalent bool attn_mask.

window (int >= 0, the last argument; 0 = none): query t sees key s only if |t - s| <= window, on top of causal,
attn_mask and segment_ids (ModernBERT's local layers: window = local_attention // 2, bidirectional). Kernels apply it
per tile and skip key tiles outside [t - window, t + window]; the reference builds the (T, S) band per head.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import reference, segments

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_gqa_args(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float, attn_mask: Optional[Tensor],
                   scale: float, op: str = "gqa_attention_fwd", segment_ids: Optional[Tensor] = None,
                   window: int = 0) -> None:  # fmt: skip
    """Raise a clear error naming the argument for anything the attention ops do not define."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q must be (B, T, h, dh) and k, v (B, S, hk, dh); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")  # fmt: skip
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k, v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, t, h, dh = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != dh:
        raise ValueError(f"{op}: k and v must be (B={b}, S, hk, dh={dh}); got k {tuple(k.shape)}, v {tuple(v.shape)}")
    hk = k.shape[2]
    if hk == 0 or h % hk != 0:
        raise ValueError(f"{op}: the query heads h={h} must be a multiple of the kv heads hk={hk}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{op}: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if causal and k.shape[1] != t:
        raise ValueError(f"{op}: causal=True needs as many keys as queries (S == T); got T={t}, S={k.shape[1]}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1); got {dropout_p}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite; got {scale}")
    _check_window(window, t, k.shape[1], op)
    if segment_ids is not None:
        _check_segment_ids(segment_ids, q, k, op)
    if attn_mask is None:
        return
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"{op}: attn_mask must be torch.bool (True = keep) or a floating dtype (additive bias: "
                        f"float16, bfloat16, float32, float64); got {attn_mask.dtype}")  # fmt: skip
    full = (b, h, t, k.shape[1])
    shape = tuple(attn_mask.shape)
    if len(shape) > 4 or any(m not in (1, f) for m, f in zip(shape[::-1], full[::-1])):
        raise ValueError(f"{op}: attn_mask of shape {shape} does not broadcast to (B, h, T, S) = {full}")
    if attn_mask.device != q.device:
        raise ValueError(f"{op}: attn_mask is on {attn_mask.device}, q on {q.device}")


def _check_segment_ids(seg: Tensor, q: Tensor, k: Tensor, op: str) -> None:
    if seg.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: segment_ids must be int32 or int64 (0 = padding, equal ids = one sequence); "
                        f"got {seg.dtype}")  # fmt: skip
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    if tuple(seg.shape) != (b, s):
        raise ValueError(f"{op}: segment_ids must be (B, S) = {(b, s)}; got {tuple(seg.shape)}")
    if t != s:
        raise ValueError(f"{op}: segment_ids need as many keys as queries (S == T); got T={t}, S={s}")
    if seg.device != q.device:
        raise ValueError(f"{op}: segment_ids is on {seg.device}, q on {q.device}")


def _check_window(window, t: int, s: int, op: str) -> None:
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"{op}: window must be an int (0 = no window, w > 0: |i - j| <= w); got {window!r}")
    if window < 0:
        raise ValueError(f"{op}: window must be >= 0 (0 = no window, w > 0: |i - j| <= w); got {window}")
    if window > 0 and t != s:
        raise ValueError(f"{op}: window > 0 needs as many keys as queries (S == T); got T={t}, S={s}")


def band_hidden(t: int, s: int, window: int, device) -> Optional[Tensor]:
    """(T, S) bool, True where |t - s| > window (the keys a sliding window hides); None when window == 0."""
    if window == 0:
        return None
    rows = torch.arange(t, device=device)[:, None]
    keys = torch.arange(s, device=device)[None, :]
    return (rows - keys).abs_() > window


def check_mask_grad(attn_mask: Optional[Tensor]) -> None:
    """The ops define no gradient for the mask: a mask that requires grad would silently get none, so refuse it."""
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError("gqa_attention_fwd: attn_mask requires grad, but the attention ops return no gradient for "
                         "the mask (a learned bias would silently not train); pass attn_mask.detach() or compute "
                         "attention with the bias outside ckpt_ext")  # fmt: skip


def empty_threshold(attn_mask: Optional[Tensor]) -> float:
    """Row max at or below which a row has no visible key: -inf, or half the float mask dtype's most negative value."""
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return float("-inf")
    return torch.finfo(attn_mask.dtype).min / 2


def mask4(attn_mask: Optional[Tensor]) -> Optional[Tensor]:
    """attn_mask as a 4-D view (B|1, h|1, T|1, S|1) (leading 1s added; never expanded, never copied)."""
    if attn_mask is None:
        return None
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def hash_keep(flat: Tensor, p: float, seed: int) -> Tensor:
    """The reference hash mask (reference.dropout_keep_mask's formula) at the int64 flat indices ``flat`` (mod 2³²)."""
    key = reference.seed_key(seed)
    h = reference.fmix32((reference.fmix32((flat & 0xFFFFFFFF) ^ key) + key) & 0xFFFFFFFF)
    return (h >> 8) >= reference.dropout_threshold(p)


def _head_flat_index(b: int, h: int, i: int, t: int, s: int, device) -> Tensor:
    """Flat (B, h, T, S) index of head i's elements: (B, T, S) int64."""
    ar = lambda n: torch.arange(n, dtype=torch.int64, device=device)  # noqa: E731
    return ((ar(b) * h + i) * (t * s))[:, None, None] + (ar(t) * s)[None, :, None] + ar(s)[None, None, :]


def _head_scores(q, k, i, g, causal, m4, scale, cdt, seg_vis=None, band=None) -> Tensor:
    """S_i (B, T, S) in cdt for query head i: scale · q_i k_jᵀ + bias_i, -inf where seg_vis (B, T, S) is False,
    above the diagonal when causal and where band (T, S) is True (outside the window)."""
    qi, kj = q[:, :, i].to(cdt), k[:, :, i // g].to(cdt)  # (B, T, dh), (B, S, dh)
    s = torch.bmm(qi, kj.transpose(1, 2)).mul_(scale)  # (B, T, S)
    if m4 is not None:
        mi = m4[:, i if m4.shape[1] > 1 else 0]  # (B|1, T|1, S|1)
        if mi.dtype == torch.bool:
            s.masked_fill_(~mi, float("-inf"))
        else:
            s.add_(mi.to(cdt))
    if seg_vis is not None:
        s.masked_fill_(~seg_vis, float("-inf"))
    if band is not None:
        s.masked_fill_(band, float("-inf"))
    if causal:
        t, n = s.shape[1:]
        s.masked_fill_(torch.ones(t, n, dtype=torch.bool, device=s.device).triu_(1), float("-inf"))
    return s


def _dropped(x: Tensor, keep: Optional[Tensor], dropout_p: float) -> Tensor:
    return x if keep is None else torch.where(keep, x * (1.0 / (1.0 - dropout_p)), torch.zeros((), dtype=x.dtype))


def _seg_vis(segment_ids: Optional[Tensor]) -> Optional[Tensor]:
    return None if segment_ids is None else segments.visibility(segment_ids)[:, 0]  # (B, T, S)


def gqa_attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float, seed: int,
                      attn_mask: Optional[Tensor], scale: float, segment_ids: Optional[Tensor] = None,
                      window: int = 0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """out (B, T, h, dh) in q.dtype, lse (B, h, T) in the compute dtype; see the module docstring."""
    check_gqa_args(q, k, v, causal, dropout_p, attn_mask, scale, segment_ids=segment_ids, window=window)
    seg_vis = _seg_vis(segment_ids)
    b, t, h, dh = q.shape
    s_len, g = k.shape[1], h // k.shape[2]
    band = band_hidden(t, s_len, window, q.device)
    cdt = reference.compute_dtype(q)
    m4, thr = mask4(attn_mask), empty_threshold(attn_mask)
    out = torch.zeros((b, t, h, dh), dtype=cdt, device=q.device)
    lse = torch.full((b, h, t), float("-inf"), dtype=cdt, device=q.device)
    if t == 0 or s_len == 0:
        return out.to(q.dtype), lse
    for i in range(h):
        s = _head_scores(q, k, i, g, causal, m4, scale, cdt, seg_vis, band)  # (B, T, S)
        row_max = s.amax(dim=-1, keepdim=True)  # (B, T, 1)
        empty = row_max <= thr
        e = torch.exp(s - torch.where(empty, 0.0, row_max))
        denom = e.sum(dim=-1, keepdim=True)
        p = torch.where(empty, 0.0, e / denom)  # (B, T, S)
        lse[:, i] = torch.where(empty, float("-inf"), row_max + denom.log()).squeeze(-1)
        keep = hash_keep(_head_flat_index(b, h, i, t, s_len, q.device), dropout_p, seed) if dropout_p > 0 else None
        out[:, :, i] = _dropped(p, keep, dropout_p) @ v[:, :, i // g].to(cdt)
    return out.to(q.dtype), lse


def gqa_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                      dropout_p: float, seed: int, attn_mask: Optional[Tensor], scale: float,
                      segment_ids: Optional[Tensor] = None, window: int = 0
                      ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """VJP of gqa_attention_fwd: dq (B, T, h, dh), dk, dv (B, S, hk, dh); P rebuilt per head from the saved lse."""
    check_gqa_args(q, k, v, causal, dropout_p, attn_mask, scale, op="gqa_attention_bwd", segment_ids=segment_ids,
                   window=window)  # fmt: skip
    seg_vis = _seg_vis(segment_ids)
    b, t, h, dh = q.shape
    s_len, g = k.shape[1], h // k.shape[2]
    band = band_hidden(t, s_len, window, q.device)
    cdt = reference.compute_dtype(q)
    m4 = mask4(attn_mask)
    dq = torch.zeros((b, t, h, dh), dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    for i in range(0 if t == 0 or s_len == 0 else h):
        j = i // g
        lse_i = lse[:, i].to(cdt)[..., None]  # (B, T, 1)
        s = _head_scores(q, k, i, g, causal, m4, scale, cdt, seg_vis, band)
        p = torch.where(torch.isneginf(lse_i), 0.0, torch.exp(s - lse_i))  # (B, T, S)
        keep = hash_keep(_head_flat_index(b, h, i, t, s_len, q.device), dropout_p, seed) if dropout_p > 0 else None
        do = dout[:, :, i].to(cdt)  # (B, T, dh)
        dv[:, :, j] += _dropped(p, keep, dropout_p).transpose(1, 2) @ do
        dp = _dropped(do @ v[:, :, j].to(cdt).transpose(1, 2), keep, dropout_p)  # (B, T, S)
        ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
        dq[:, :, i] = (ds @ k[:, :, j].to(cdt)) * scale
        dk[:, :, j] += (ds.transpose(1, 2) @ q[:, :, i].to(cdt)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------------------------ packed qkv
def split_heads(qkv: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """qkv (B, T, 3d) -> q, k, v each (B, T, h, dh) strided views; head i = columns i*dh:(i+1)*dh of each third."""
    b, t, three_d = qkv.shape
    return qkv.view(b, t, 3, n_heads, three_d // 3 // n_heads).unbind(2)


def packed_fwd(gqa_fwd, qkv, n_heads, causal, dropout_p, seed, attn_mask):
    """attention_fwd through a backend's gqa forward ``gqa_fwd`` on q, k, v views of qkv (h == hk, scale 1/sqrt(dh))."""
    b, t, three_d = qkv.shape
    q, k, v = split_heads(qkv, n_heads)  # (B, T, h, dh) strided views
    out, lse = gqa_fwd(q, k, v, causal, dropout_p, seed, attn_mask, q.shape[-1] ** -0.5)
    return out.view(b, t, three_d // 3), lse


def packed_bwd(gqa_bwd, dout, qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask):
    """attention_bwd through a backend's gqa backward ``gqa_bwd``: dq | dk | dv packed as dqkv (B, T, 3d)."""
    b, t, three_d = qkv.shape
    q, k, v = split_heads(qkv, n_heads)
    grads = gqa_bwd(
        dout.view(q.shape), q, k, v, out.view(q.shape), lse, causal, dropout_p, seed, attn_mask, q.shape[-1] ** -0.5
    )
    return torch.stack(grads, dim=2).view(b, t, three_d)  # (B, T, 3, h, dh) -> (B, T, 3d)


def attention_fwd(
    qkv: Tensor, n_heads: int, causal: bool, dropout_p: float, seed: int, attn_mask: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """Softmax attention on packed qkv (B, T, 3d) -> out (B, T, d) in qkv.dtype, lse (B, h, T) float32/float64:
    gqa_attention_fwd with h query and kv heads, scale 1/sqrt(dh); the hash dropout over the flat (B, h, T, T) index."""
    return packed_fwd(gqa_attention_fwd, qkv, n_heads, causal, dropout_p, seed, attn_mask)


def attention_bwd(
    dout: Tensor,
    qkv: Tensor,
    out: Tensor,
    lse: Tensor,
    n_heads: int,
    causal: bool,
    dropout_p: float,
    seed: int,
    attn_mask: Optional[Tensor],
) -> Tensor:
    """VJP of attention_fwd: dqkv (B, T, 3d) in qkv.dtype."""
    return packed_bwd(gqa_attention_bwd, dout, qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask)
