"""``ckpt_ext::linear_cross_entropy_fwd`` / ``_bwd``: the LM head (linear + cross-entropy) without (N, V) logits.

linear_cross_entropy_fwd(hidden (N, d), weight (V, d), bias (V,)?, labels (N,) int, ignore_index, label_smoothing,
                         chunk_bytes) -> losses (N,), lse (N,)  fp32 (fp64 for fp64 hidden)     FLOPs: 2·N·V·d
linear_cross_entropy_bwd(dloss (N,), hidden, weight, bias?, labels, lse, ignore_index, label_smoothing, chunk_bytes,
                         need_dweight) -> dhidden (N, d) hidden.dtype, dweight (V, d) weight.dtype or (0,),
                                          dbias (V,) bias.dtype or (0,)    FLOPs: 6·N·V·d (4 without dweight)
The forward keeps one fp32 logsumexp per row; the backward rebuilds each chunk's logits from it (2·N·V·d) and runs
the two gradient GEMMs (dhidden = dz @ W, dweight = dzᵀ @ hidden: 2·2·N·V·d). ``chunk_bytes`` bounds the kernels'
chunk buffers: the forward walks token chunks (Triton's forward needs no buffer), the backward vocabulary chunks
(ckpt_ext.lm_head.chunk_len gives both shapes). Math: reference.py. The public function with validation, reductions
and autocast is ckpt_ext.lm_head.linear_cross_entropy.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .table import define


def _fwd_flops(hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * hidden_shape[0] * hidden_shape[1] * weight_shape[0]


def _bwd_flops(dloss_shape, hidden_shape, weight_shape, bias_shape, labels_shape, lse_shape, ignore_index,
               label_smoothing, chunk_bytes, need_dweight, out_shape=None, **kwargs) -> int:  # fmt: skip
    gemms = 3 if need_dweight else 2  # rebuilt logits, dhidden = dz @ W, dweight = dzᵀ @ hidden
    return 2 * gemms * hidden_shape[0] * hidden_shape[1] * weight_shape[0]


def _check(name: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> None:
    torch._check(hidden.dim() == 2, lambda: f"{name}: hidden must be (N, d), got {tuple(hidden.shape)}")
    n, d = hidden.shape
    torch._check(weight.dim() == 2 and weight.shape[1] == d, lambda: f"{name}: weight must be (V, {d})")
    torch._check(bias is None or bias.shape == (weight.shape[0],), lambda: f"{name}: bias must be (V,)")
    torch._check(labels.shape == (n,), lambda: f"{name}: labels must be ({n},)")


def _linear_cross_entropy_fwd_fake(hidden, weight, bias, labels, ignore_index, label_smoothing, chunk_bytes):
    _check("linear_cross_entropy_fwd", hidden, weight, bias, labels)
    n = hidden.shape[0]
    dt = reference.compute_dtype(hidden)
    return hidden.new_empty((n,), dtype=dt), hidden.new_empty((n,), dtype=dt)


linear_cross_entropy_fwd = define(
    reference.linear_cross_entropy_fwd, fake=_linear_cross_entropy_fwd_fake, flops=_fwd_flops, autocast_off=True
)


def _linear_cross_entropy_bwd_fake(
    dloss, hidden, weight, bias, labels, lse, ignore_index, label_smoothing, chunk_bytes, need_dweight
):
    _check("linear_cross_entropy_bwd", hidden, weight, bias, labels)
    n = hidden.shape[0]
    torch._check(dloss.shape == (n,) and lse.shape == (n,), lambda: f"linear_cross_entropy_bwd: dloss, lse ({n},)")
    dweight = weight.new_empty(weight.shape) if need_dweight else hidden.new_empty((0,))
    dbias = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty((0,))
    return hidden.new_empty(hidden.shape), dweight, dbias


linear_cross_entropy_bwd = define(
    reference.linear_cross_entropy_bwd, fake=_linear_cross_entropy_bwd_fake, flops=_bwd_flops, autocast_off=True
)


def _setup(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, label_smoothing, chunk_bytes = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)  # a saved statistic: the loss's gradient flows through the losses only
    ctx.save_for_backward(hidden, weight, bias, labels, lse)  # the (N, V) logits are not saved: bwd rebuilds them
    ctx.args = (ignore_index, label_smoothing, chunk_bytes)


def _backward(ctx, dloss, _dlse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    with torch.autocast(hidden.device.type, enabled=False):  # the kernels' GEMMs run in the saved inputs' dtype
        dhidden, dweight, dbias = linear_cross_entropy_bwd(
            dloss.contiguous(), hidden, weight, bias, labels, lse, *ctx.args, ctx.needs_input_grad[1]
        )
    return (
        dhidden if ctx.needs_input_grad[0] else None,
        dweight if ctx.needs_input_grad[1] else None,
        dbias if bias is not None and ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
        None,
    )


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup)
