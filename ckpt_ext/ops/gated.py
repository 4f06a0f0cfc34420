"""The pointwise ops of a gated MLP, h = act(g) · u, and their backward: one definition for every gate activation.

``define_gated(fwd, bwd)`` registers ``fwd(g (N, F), u (N, F)) -> h (N, F)`` and ``bwd(dh, g, u) -> (dg, du)`` from
their reference math (op table rows: schema from the signature, shape-checking fakes) and makes the forward
differentiable through the backward op. SwiGLU (act = silu) and GeGLU (act = gelu_tanh) are its two users.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .table import define


def check_pair(name: str, a: Tensor, b: Tensor) -> None:
    torch._check(a.dim() == 2 and a.shape == b.shape, lambda: f"{name}: g and u must be the same (N, F)")


def define_gated(fwd_reference, bwd_reference):
    """(forward op, backward op) of one gated activation."""
    fwd_name, bwd_name = fwd_reference.__name__, bwd_reference.__name__

    def fwd_fake(g, u):
        check_pair(fwd_name, g, u)
        return g.new_empty(g.shape)

    def bwd_fake(dh, g, u):
        check_pair(bwd_name, g, u)
        torch._check(dh.shape == g.shape, lambda: f"{bwd_name}: dh must match g")
        return g.new_empty(g.shape), u.new_empty(u.shape)

    fwd = define(fwd_reference, fake=fwd_fake)
    bwd = define(bwd_reference, fake=bwd_fake)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        return bwd(dh.contiguous(), g, u)

    fwd.register_autograd(backward, setup_context=setup)
    return fwd, bwd
