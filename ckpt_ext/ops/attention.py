"""``ckpt_ext::gqa_attention_fwd``/``_bwd`` (separate q, k, v; grouped-query) and ``ckpt_ext::attention_fwd``/``_bwd``
(the packed qkv projection): softmax attention ops.

gqa_attention_fwd(q (B, T, h, dh), k, v (B, S, hk, dh), causal, dropout_p, seed, attn_mask?, scale, segment_ids?)
    -> out (B, T, h, dh) q.dtype, lse (B, h, T) fp32 (fp64 for fp64)
gqa_attention_bwd(dout, q, k, v, out, lse, causal, dropout_p, seed, attn_mask?, scale, segment_ids?)
    -> dq, dk, dv (q/k/v shapes)
segment_ids (B, S) int32/int64 (T == S): key padding and packed sequences without a 4-D mask; row t sees key s iff
seg[b, s] != 0 and seg[b, t] == seg[b, s] (ckpt_ext/segments.py converts lengths, keep masks, cu_seqlens and position
ids). It combines with attn_mask (a key must pass both) and, being integer, never takes a gradient.
Query head i reads kv head i // (h // hk); dk/dv sum over the heads of a group. Math, masks, the empty-row rule and
the dropout index: ckpt_ext/reference_attention.py. q, k, v may be strided views with unit last stride (GPT-2 passes
views of its packed qkv). Integer masks raise TypeError; a mask that requires grad raises ValueError when autograd
records the op (no mask gradient is defined). The cpp/cuda backends run native_attention's bounded-memory CPU path
until cpp_bridge lists these ops (backend.kernel would otherwise give the reference math).

attention_fwd(qkv (B, T, 3d), n_heads, causal, dropout_p, seed, attn_mask?) -> out (B, T, d) qkv.dtype,
                                                                             lse (B, h, T) fp32 (fp64 for fp64 qkv)
attention_bwd(dout (B, T, d), qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask?) -> dqkv (B, T, 3d)
q|k|v are the three thirds of qkv's last dim, head i = columns i*dh:(i+1)*dh of each. Probability dropout uses the
hash mask (reproducible from seed). attn_mask is additive (float) or keep (bool), broadcastable to (B, h, T, T).
Kernels: reference math always works; without dropout and mask, CPU runs aten's flash kernel for CPU (see cpp_bridge).
FLOPs follow torch's SDPA convention: forward 4·B·h·T²·dh, backward 10·B·h·T²·dh (causal not halved; T·S for gqa).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference_attention


def _lse_dtype(qkv: Tensor) -> torch.dtype:
    return torch.float64 if qkv.dtype == torch.float64 else torch.float32


@torch.library.custom_op("ckpt_ext::attention_fwd", mutates_args=())
def attention_fwd(
    qkv: Tensor, n_heads: int, causal: bool, dropout_p: float, seed: int, attn_mask: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    return backend.kernel("attention_fwd", qkv.device.type)(qkv, n_heads, causal, dropout_p, seed, attn_mask)


@attention_fwd.register_fake
def _(qkv, n_heads, causal, dropout_p, seed, attn_mask):
    torch._check(qkv.dim() == 3 and qkv.shape[2] % (3 * n_heads) == 0, lambda: "attention_fwd: qkv must be (B, T, 3d)")
    b, t, three_d = qkv.shape
    return qkv.new_empty((b, t, three_d // 3)), qkv.new_empty((b, n_heads, t), dtype=_lse_dtype(qkv))


@torch.library.custom_op("ckpt_ext::attention_bwd", mutates_args=())
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
    return backend.kernel("attention_bwd", qkv.device.type)(
        dout, qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask
    )


@attention_bwd.register_fake
def _(dout, qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask):
    torch._check(dout.shape == out.shape, lambda: "attention_bwd: dout must match out")
    return qkv.new_empty(qkv.shape)


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
@torch.library.custom_op("ckpt_ext::gqa_attention_fwd", mutates_args=())
def gqa_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    dropout_p: float,
    seed: int,
    attn_mask: Optional[Tensor],
    scale: float,
    segment_ids: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    reference_attention.check_gqa_args(q, k, v, causal, dropout_p, attn_mask, scale, segment_ids=segment_ids)
    return backend.kernel("gqa_attention_fwd", q.device.type)(
        q, k, v, causal, dropout_p, seed, attn_mask, scale, segment_ids
    )


@gqa_attention_fwd.register_fake
def _(q, k, v, causal, dropout_p, seed, attn_mask, scale, segment_ids=None):
    reference_attention.check_gqa_args(q, k, v, causal, dropout_p, attn_mask, scale, segment_ids=segment_ids)
    b, t, h, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, h, t), dtype=_lse_dtype(q))


@torch.library.custom_op("ckpt_ext::gqa_attention_bwd", mutates_args=())
def gqa_attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    dropout_p: float,
    seed: int,
    attn_mask: Optional[Tensor],
    scale: float,
    segment_ids: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    reference_attention.check_gqa_args(
        q, k, v, causal, dropout_p, attn_mask, scale, op="gqa_attention_bwd", segment_ids=segment_ids
    )
    return backend.kernel("gqa_attention_bwd", q.device.type)(
        dout, q, k, v, out, lse, causal, dropout_p, seed, attn_mask, scale, segment_ids
    )


@gqa_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, dropout_p, seed, attn_mask, scale, segment_ids=None):
    reference_attention.check_gqa_args(
        q, k, v, causal, dropout_p, attn_mask, scale, op="gqa_attention_bwd", segment_ids=segment_ids
    )
    torch._check(dout.shape == q.shape, lambda: "gqa_attention_bwd: dout must be (B, T, h, dh) like q")
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _gqa_setup(ctx, inputs, output):
    q, k, v, causal, dropout_p, seed, attn_mask, scale, segment_ids = inputs
    reference_attention.check_mask_grad(attn_mask)
    out, lse = output
    ctx.args = (causal, dropout_p, seed)
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, segment_ids)


def _gqa_backward(ctx, dout, _dlse):
    q, k, v, out, lse, attn_mask, segment_ids = ctx.saved_tensors
    dq, dk, dv = gqa_attention_bwd(dout.contiguous(), q, k, v, out, lse, *ctx.args, attn_mask, ctx.scale, segment_ids)
    return dq, dk, dv, None, None, None, None, None, None


gqa_attention_fwd.register_autograd(_gqa_backward, setup_context=_gqa_setup)
