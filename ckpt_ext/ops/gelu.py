"""``ckpt_ext::bias_gelu`` / ``ckpt_ext::gelu_bwd``: GELU (erf or tanh form) and its derivative from the pre-activation.

bias_gelu(x (N, H), bias (H,)?, approximate) -> gelu(x + bias) (N, H) x.dtype
gelu_bwd(da (N, H), u (N, H), approximate)  -> da * gelu'(u)    (N, H) u.dtype
approximate is "none" (y = x Φ(x)) or "tanh" (GPT-2's gelu_new). fp32 math inside for every input dtype.
"""

from __future__ import annotations

import torch

from .. import reference
from .table import define


def _check(approximate: str) -> None:
    torch._check(approximate in ("none", "tanh"), lambda: f"approximate must be 'none' or 'tanh', got {approximate!r}")


def _bias_gelu_fake(x, bias, approximate):
    _check(approximate)
    torch._check(bias is None or bias.shape == (x.shape[-1],), lambda: "bias_gelu: bias must be (H,)")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


bias_gelu = define(reference.bias_gelu, fake=_bias_gelu_fake)


def _gelu_bwd_fake(da, u, approximate):
    _check(approximate)
    torch._check(da.shape == u.shape, lambda: "gelu_bwd: da and u must have the same shape")
    return torch.empty_like(u, memory_format=torch.contiguous_format)


gelu_bwd = define(reference.gelu_bwd, fake=_gelu_bwd_fake)


def _setup(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.approximate = approximate
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, bias)


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    u = x if bias is None else x + bias
    du = gelu_bwd(grad.contiguous(), u.contiguous(), ctx.approximate)
    dbias = du.sum(dim=tuple(range(du.dim() - 1))).to(bias.dtype) if ctx.has_bias else None
    return du, dbias, None


bias_gelu.register_autograd(_backward, setup_context=_setup)
