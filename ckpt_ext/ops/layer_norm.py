"""``ckpt_ext::layer_norm_fwd`` / ``ckpt_ext::layer_norm_bwd``: LayerNorm that keeps fp32 statistics, not its output.

layer_norm_fwd(x (N, d), weight (d,), bias (d,), eps) -> y (N, d) x.dtype, mean (N,) fp32, rstd (N,) fp32
layer_norm_bwd(dy (N, d), x, mean, rstd, weight, bias, dresidual (N, d)?, emit_y)
    -> dx (N, d) x.dtype (+ dresidual), dweight (d,), dbias (d,), y (N, d) if emit_y else (0,)
The backward rebuilds x̂ = (x - mean) * rstd from the statistics and, when asked, also emits y = x̂ * weight + bias for
the weight gradient of the matmul that consumed it, so the LN output never has to be kept. Math: reference.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("ckpt_ext::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return backend.kernel("layer_norm_fwd", x.device.type)(x, weight, bias, eps)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    torch._check(x.dim() == 2, lambda: f"layer_norm_fwd: x must be (N, d), got {tuple(x.shape)}")
    torch._check(weight.shape == (x.shape[1],) and bias.shape == (x.shape[1],), lambda: "weight/bias must be (d,)")
    n = x.shape[0]
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty((n,), dtype=_stats_dtype(x)),
        x.new_empty((n,), dtype=_stats_dtype(x)),
    )


@torch.library.custom_op("ckpt_ext::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    dresidual: Optional[Tensor],
    emit_y: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backend.kernel("layer_norm_bwd", x.device.type)(dy, x, mean, rstd, weight, bias, dresidual, emit_y)


@layer_norm_bwd.register_fake
def _(dy, x, mean, rstd, weight, bias, dresidual, emit_y):
    torch._check(dy.shape == x.shape and x.dim() == 2, lambda: "layer_norm_bwd: dy and x must be the same (N, d)")
    torch._check(mean.shape == (x.shape[0],) and rstd.shape == (x.shape[0],), lambda: "mean/rstd must be (N,)")
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if emit_y else x.new_empty((0,))
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(bias, memory_format=torch.contiguous_format),
        y,
    )


def _setup_fwd(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias)


def _backward_fwd(ctx, dy, _dmean, _drstd):
    x, mean, rstd, weight, bias = ctx.saved_tensors
    dx, dw, db, _ = layer_norm_bwd(dy.contiguous(), x, mean, rstd, weight, bias, None, False)
    return dx, dw, db, None


layer_norm_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)
