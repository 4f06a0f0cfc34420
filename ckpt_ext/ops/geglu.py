"""GeGLU ops of the Gemma / ModernBERT MLP, ``down(gelu_tanh(gate(n)) · up(n))`` (the gated MLP form "geglu").

geglu_fwd(g (N, F), u (N, F)) -> h = gelu_tanh(g)·u (N, F) g.dtype
geglu_bwd(dh, g, u) -> dg = dh·u·gelu_tanh'(g), du = dh·gelu_tanh(g)
    gelu_tanh(g) = g/2·(1 + tanh(√(2/π)(g + 0.044715 g³)))
fp32 pointwise math. The MLP segment (block_parts/mlp.py) runs GeGLU from these two ops under every policy: the
policy's save set is the same as SwiGLU's (g and u, or nothing); what ffn / block rebuild is rebuilt by the norm,
the gate/up GEMMs and geglu_fwd instead of one fused recompute kernel. Math: reference.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .table import define


def _check_pair(name: str, a: Tensor, b: Tensor) -> None:
    torch._check(a.dim() == 2 and a.shape == b.shape, lambda: f"{name}: g and u must be the same (N, F)")


def _geglu_fwd_fake(g, u):
    _check_pair("geglu_fwd", g, u)
    return g.new_empty(g.shape)


geglu_fwd = define(reference.geglu_fwd, fake=_geglu_fwd_fake)


def _geglu_bwd_fake(dh, g, u):
    _check_pair("geglu_bwd", g, u)
    torch._check(dh.shape == g.shape, lambda: "geglu_bwd: dh must match g")
    return g.new_empty(g.shape), u.new_empty(u.shape)


geglu_bwd = define(reference.geglu_bwd, fake=_geglu_bwd_fake)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dh):
    g, u = ctx.saved_tensors
    return geglu_bwd(dh.contiguous(), g, u)


geglu_fwd.register_autograd(_backward, setup_context=_setup)
