"""``ckpt_ext::rope``: rotary position embedding of q and k in one op, and its exact adjoint (``inverse=True``).

rope(q (B, T, hq, dh), k (B, T, hk, dh), cos (B|1, T, dh), sin (B|1, T, dh), inverse) -> q', k' (contiguous, q/k dtype)
cos and sin are what the model computed (Hugging Face's ``position_embeddings``, with whatever rope scaling its
config names); the op never computes frequencies. Half-split convention: rotate_half(x) = (-x₂, x₁).
forward: x·cos + rotate_half(x)·sin.  adjoint: x·cos + rotate_halfᵀ(x·sin), rotate_halfᵀ(z) = (z₂, -z₁), which the
autograd formula and the block's backward call on dq, dk. fp32 math inside. Math: reference.py.
"""

from __future__ import annotations

import torch

from .. import reference
from .table import define


def _rope_fake(q, k, cos, sin, inverse):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "rope: q and k must be (B, T, heads, head_dim)")
    b, t, _, dh = q.shape
    torch._check(k.shape[0] == b and k.shape[1] == t and k.shape[3] == dh, lambda: "rope: k must be (B, T, hk, dh)")
    torch._check(dh % 2 == 0, lambda: f"rope: head_dim must be even, got {dh}")
    for name, c in (("cos", cos), ("sin", sin)):
        torch._check(
            c.dim() == 3 and c.shape[0] in (1, b) and c.shape[1] == t and c.shape[2] == dh,
            lambda name=name, c=c: (
                f"rope: {name} must be (1 or B, T, head_dim) = (1|{b}, {t}, {dh}), got {tuple(c.shape)}"
            ),
        )
    return q.new_empty(q.shape), k.new_empty(k.shape)


rope = define(reference.rope, fake=_rope_fake)


def _setup(ctx, inputs, output):
    _, _, cos, sin, inverse = inputs
    ctx.inverse = inverse
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = rope(dq.contiguous(), dk.contiguous(), cos, sin, not ctx.inverse)  # the adjoint's adjoint: the rotation
    return dq, dk, None, None, None


rope.register_autograd(_backward, setup_context=_setup)
