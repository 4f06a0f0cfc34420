"""``ckpt_ext::layer_norm_fwd`` / ``ckpt_ext::layer_norm_bwd``: LayerNorm that keeps fp32 statistics, not its output.

layer_norm_fwd(x (N, d), weight (d,), bias (d,), eps) -> y (N, d) x.dtype, mean (N,) fp32, rstd (N,) fp32
layer_norm_bwd(dy (N, d), x, mean, rstd, weight, bias, dresidual (N, d)?, emit_y)
    -> dx (N, d) x.dtype (+ dresidual), dweight (d,), dbias (d,), y (N, d) if emit_y else (0,)
The backward rebuilds x̂ = (x - mean) * rstd from the statistics and, when asked, also emits y = x̂ * weight + bias for
the weight gradient of the matmul that consumed it, so the LN output never has to be kept. Math: reference.py.
"""

from __future__ import annotations

import torch

from .. import reference
from .table import define


def _fwd_fake(x, weight, bias, eps):
    torch._check(x.dim() == 2, lambda: f"layer_norm_fwd: x must be (N, d), got {tuple(x.shape)}")
    torch._check(weight.shape == (x.shape[1],) and bias.shape == (x.shape[1],), lambda: "weight/bias must be (d,)")
    n = x.shape[0]
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty((n,), dtype=reference.compute_dtype(x)),
        x.new_empty((n,), dtype=reference.compute_dtype(x)),
    )


def _bwd_fake(dy, x, mean, rstd, weight, bias, dresidual, emit_y):
    torch._check(dy.shape == x.shape and x.dim() == 2, lambda: "layer_norm_bwd: dy and x must be the same (N, d)")
    torch._check(mean.shape == (x.shape[0],) and rstd.shape == (x.shape[0],), lambda: "mean/rstd must be (N,)")
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if emit_y else x.new_empty((0,))
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(bias, memory_format=torch.contiguous_format),
        y,
    )


layer_norm_fwd = define(reference.layer_norm_fwd, fake=_fwd_fake)
layer_norm_bwd = define(reference.layer_norm_bwd, fake=_bwd_fake)


def _setup_fwd(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias)


def _backward_fwd(ctx, dy, _dmean, _drstd):
    x, mean, rstd, weight, bias = ctx.saved_tensors
    dx, dw, db, _ = layer_norm_bwd(dy.contiguous(), x, mean, rstd, weight, bias, None, False)
    return dx, dw, db, None


layer_norm_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)
