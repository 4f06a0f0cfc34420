"""``ckpt_ext::bias_gelu`` / ``ckpt_ext::gelu_bwd``: GELU (erf or tanh form) and its derivative from the pre-activation.

bias_gelu(x (N, H), bias (H,)?, approximate) -> gelu(x + bias) (N, H) x.dtype
gelu_bwd(da (N, H), u (N, H), approximate)  -> da * gelu'(u)    (N, H) u.dtype
approximate is "none" (y = x Φ(x)) or "tanh" (GPT-2's gelu_new). fp32 math inside for every input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend


def _check(approximate: str) -> None:
    torch._check(approximate in ("none", "tanh"), lambda: f"approximate must be 'none' or 'tanh', got {approximate!r}")


@torch.library.custom_op("ckpt_ext::bias_gelu", mutates_args=())
def bias_gelu(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    return backend.kernel("bias_gelu", x.device.type)(x, bias, approximate)


@bias_gelu.register_fake
def _(x, bias, approximate):
    _check(approximate)
    torch._check(bias is None or bias.shape == (x.shape[-1],), lambda: "bias_gelu: bias must be (H,)")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("ckpt_ext::gelu_bwd", mutates_args=())
def gelu_bwd(da: Tensor, u: Tensor, approximate: str) -> Tensor:
    return backend.kernel("gelu_bwd", u.device.type)(da, u, approximate)


@gelu_bwd.register_fake
def _(da, u, approximate):
    _check(approximate)
    torch._check(da.shape == u.shape, lambda: "gelu_bwd: da and u must have the same shape")
    return torch.empty_like(u, memory_format=torch.contiguous_format)


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
