"""``ckpt_ext::dropout_add``: dropout with a hash mask reproducible from a seed, fused with a residual add.

dropout_add(x (...), residual (...)?, p, seed) -> out = x * keep / (1 - p) + residual, dtype result_type(x, residual).
keep is a pure function of (element index, seed) (see reference.dropout_keep_mask), so recompute in backward and every
backend draw the identical mask and nothing is stored. The op is its own adjoint:
d x = dropout_add(d out, None, p, seed), d residual = d out.
"""

from __future__ import annotations

import torch

from .. import reference
from .table import define


def _check_residual(x, residual, p, seed):
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"dropout_add: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")


def _dropout_add_fake(x, residual, p, seed):
    torch._check(0.0 <= p < 1.0, lambda: f"dropout_add: p must be in [0, 1), got {p}")
    dtype = x.dtype if residual is None else torch.result_type(x, residual)
    return torch.empty(x.shape, dtype=dtype, device=x.device)


dropout_add = define(reference.dropout_add, fake=_dropout_add_fake, check=_check_residual)


def _setup(ctx, inputs, output):
    x, residual, p, seed = inputs
    ctx.p, ctx.seed = p, seed
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, grad):
    grad = grad.contiguous()
    dx = dropout_add(grad, None, ctx.p, ctx.seed).to(ctx.x_dtype)
    dres = None if ctx.residual_dtype is None else grad.to(ctx.residual_dtype)
    return dx, dres, None, None


dropout_add.register_autograd(_backward, setup_context=_setup)
