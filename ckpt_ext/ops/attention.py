"""``ckpt_ext::gqa_attention_fwd``/``_bwd`` (separate q, k, v; grouped-query) and ``ckpt_ext::attention_fwd``/``_bwd``
(the packed qkv projection): softmax attention ops.

gqa_attention_fwd(q (B, T, h, dh), k, v (B, S, hk, dh), causal, dropout_p, seed, attn_mask?, scale, segment_ids?,
                  window=0) -> out (B, T, h, dh) q.dtype, lse (B, h, T) fp32 (fp64 for fp64)
gqa_attention_bwd(dout, q, k, v, out, lse, causal, dropout_p, seed, attn_mask?, scale, segment_ids?, window=0)
    -> dq, dk, dv (q/k/v shapes)
window (int >= 0, T == S when > 0): query t sees key s only if |t - s| <= window (0 = every key), on top of causal,
attn_mask and segment_ids: a sliding window the kernels apply per tile (key tiles outside it are skipped), never a
(T, S) mask.
segment_ids (B, S) int32/int64 (T == S): key padding and packed sequences without a 4-D mask; row t sees key s iff
seg[b, s] > 0 and |seg[b, t]| == seg[b, s] (0: padding; negative: an encoder's padded key, its row still attending;
ckpt_ext/segments.py converts lengths, keep and key masks, cu_seqlens and position ids). It combines with attn_mask (a
key must pass both) and, being integer, never takes a gradient.
Query head i reads kv head i // (h // hk); dk/dv sum over the heads of a group. Math, masks, the empty-row rule and
the dropout index: ckpt_ext/reference_attention.py. q, k, v may be strided views with unit last stride (GPT-2 passes
views of its packed qkv). Integer masks raise TypeError; a mask that requires grad raises ValueError when autograd
records the op (no mask gradient is defined).

attention_fwd(qkv (B, T, 3d), n_heads, causal, dropout_p, seed, attn_mask?) -> out (B, T, d) qkv.dtype,
                                                                             lse (B, h, T) fp32 (fp64 for fp64 qkv)
attention_bwd(dout (B, T, d), qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask?) -> dqkv (B, T, 3d)
q|k|v are the three thirds of qkv's last dim, head i = columns i*dh:(i+1)*dh of each. Probability dropout uses the
hash mask (reproducible from seed). attn_mask is additive (float) or keep (bool), broadcastable to (B, h, T, T).
Kernels: the reference math always works; the cpp/cuda backends run ckpt_ext/backends/aten_attention.py's routes.
FLOPs follow torch's SDPA convention: forward 4·B·h·T²·dh, backward 10·B·h·T²·dh (causal not halved; T·S for gqa).
"""

from __future__ import annotations

import torch

from .. import reference, reference_attention
from .table import define


# ------------------------------------------------------------------------------------------------ packed qkv
def _bhtd(qkv_shape, n_heads):
    b, t, three_d = qkv_shape
    return b, n_heads, t, three_d // 3 // n_heads


def _attention_fwd_flops(qkv_shape, n_heads, *args, out_shape=None, **kwargs) -> int:
    b, h, t, dh = _bhtd(qkv_shape, n_heads)
    return 4 * b * h * t * t * dh


def _attention_bwd_flops(dout_shape, qkv_shape, o_shape, lse_shape, n_heads, *args, out_shape=None, **kwargs) -> int:
    b, h, t, dh = _bhtd(qkv_shape, n_heads)
    return 10 * b * h * t * t * dh  # dV, dP, dQ, dK and the rebuilt scores, as torch counts SDPA's backward


def _attention_fwd_fake(qkv, n_heads, causal, dropout_p, seed, attn_mask):
    torch._check(qkv.dim() == 3 and qkv.shape[2] % (3 * n_heads) == 0, lambda: "attention_fwd: qkv must be (B, T, 3d)")
    b, t, three_d = qkv.shape
    lse_dtype = reference.compute_dtype(qkv)
    return qkv.new_empty((b, t, three_d // 3)), qkv.new_empty((b, n_heads, t), dtype=lse_dtype)


def _attention_bwd_fake(dout, qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask):
    torch._check(dout.shape == out.shape, lambda: "attention_bwd: dout must match out")
    return qkv.new_empty(qkv.shape)


attention_fwd = define(reference_attention.attention_fwd, fake=_attention_fwd_fake, flops=_attention_fwd_flops)
attention_bwd = define(reference_attention.attention_bwd, fake=_attention_bwd_fake, flops=_attention_bwd_flops)


def _setup(ctx, inputs, output):
    qkv, n_heads, causal, dropout_p, seed, attn_mask = inputs
    reference_attention.check_mask_grad(attn_mask)
    out, lse = output
    ctx.args = (n_heads, causal, dropout_p, seed)
    ctx.save_for_backward(qkv, out, lse, attn_mask)


def _backward(ctx, dout, _dlse):
    qkv, out, lse, attn_mask = ctx.saved_tensors
    dqkv = attention_bwd(dout.contiguous(), qkv, out, lse, *ctx.args, attn_mask)
    return dqkv, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------ grouped-query
def _gqa_fwd_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    """Dense count 4·B·h·T·S·dh: a bound on every backend's work. Causality, segment ids and a sliding window are not
    subtracted (as torch counts SDPA): the reference backend computes every score and masks it, and the tiled kernels
    skip tiles by their own tile sizes, so the band's useful work ((2w + 1) / S of this) bounds none of them."""
    b, t, h, dh = q_shape
    return 4 * b * h * t * k_shape[1] * dh


def _gqa_bwd_flops(dout_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    b, t, h, dh = q_shape
    return 10 * b * h * t * k_shape[1] * dh  # as attention_bwd: dV, dP, dQ, dK and the rebuilt scores (dense bound)


def _gqa_fwd_check(q, k, v, causal, dropout_p, seed, attn_mask, scale, segment_ids=None, window=0):
    reference_attention.check_gqa_args(
        q, k, v, causal, dropout_p, attn_mask, scale, segment_ids=segment_ids, window=window
    )


def _gqa_bwd_check(dout, q, k, v, out, lse, causal, dropout_p, seed, attn_mask, scale, segment_ids=None, window=0):
    reference_attention.check_gqa_args(
        q, k, v, causal, dropout_p, attn_mask, scale, op="gqa_attention_bwd", segment_ids=segment_ids, window=window
    )


def _gqa_fwd_fake(q, k, v, causal, dropout_p, seed, attn_mask, scale, segment_ids=None, window=0):
    _gqa_fwd_check(q, k, v, causal, dropout_p, seed, attn_mask, scale, segment_ids, window)
    b, t, h, _ = q.shape
    lse_dtype = reference.compute_dtype(q)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, h, t), dtype=lse_dtype)


def _gqa_bwd_fake(dout, q, k, v, out, lse, causal, dropout_p, seed, attn_mask, scale, segment_ids=None, window=0):
    _gqa_bwd_check(dout, q, k, v, out, lse, causal, dropout_p, seed, attn_mask, scale, segment_ids, window)
    torch._check(dout.shape == q.shape, lambda: "gqa_attention_bwd: dout must be (B, T, h, dh) like q")
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


gqa_attention_fwd = define(
    reference_attention.gqa_attention_fwd, fake=_gqa_fwd_fake, check=_gqa_fwd_check, flops=_gqa_fwd_flops
)
gqa_attention_bwd = define(
    reference_attention.gqa_attention_bwd, fake=_gqa_bwd_fake, check=_gqa_bwd_check, flops=_gqa_bwd_flops
)


def _gqa_setup(ctx, inputs, output):
    q, k, v, causal, dropout_p, seed, attn_mask, scale, segment_ids, window = inputs
    reference_attention.check_mask_grad(attn_mask)
    out, lse = output
    ctx.args = (causal, dropout_p, seed)
    ctx.scale, ctx.window = scale, window
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, segment_ids)


def _gqa_backward(ctx, dout, _dlse):
    q, k, v, out, lse, attn_mask, segment_ids = ctx.saved_tensors
    dq, dk, dv = gqa_attention_bwd(
        dout.contiguous(), q, k, v, out, lse, *ctx.args, attn_mask, ctx.scale, segment_ids, ctx.window
    )
    return dq, dk, dv, None, None, None, None, None, None, None


gqa_attention_fwd.register_autograd(_gqa_backward, setup_context=_gqa_setup)
