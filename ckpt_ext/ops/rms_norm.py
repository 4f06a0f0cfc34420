"""``ckpt_ext::rms_norm_fwd`` / ``ckpt_ext::rms_norm_bwd``: RMSNorm keeping one fp32 statistic per row.

rms_norm_fwd(x (N, d), weight (d,), eps) -> y (N, d) in promote_types(x.dtype, weight.dtype), rstd (N,) fp32
rms_norm_bwd(dy (N, d), x, rstd, weight, dresidual (N, d)?, emit_y) -> dx (N, d) x.dtype (+ dresidual),
                                                                       dweight (d,) weight.dtype, y (N, d) or (0,)
Hugging Face's cast order (LlamaRMSNorm, Qwen3's per-head q/k norm with x viewed (N·heads, head_dim)):
rstd = rsqrt(mean(x²) + eps) in fp32, n = (x·rstd).to(x.dtype), y = weight · n. The backward rebuilds x̂ = x·rstd
and, when asked, emits y for the weight gradient of the matmul that consumed it. Math: reference.py.
"""

from __future__ import annotations

import torch

from .. import reference
from .table import define


def _rms_norm_fwd_fake(x, weight, eps):
    torch._check(x.dim() == 2, lambda: f"rms_norm_fwd: x must be (N, d), got {tuple(x.shape)}")
    torch._check(weight.shape == (x.shape[1],), lambda: f"rms_norm_fwd: weight must be ({x.shape[1]},)")
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty((x.shape[0],), dtype=reference.compute_dtype(x))


rms_norm_fwd = define(reference.rms_norm_fwd, fake=_rms_norm_fwd_fake)


def _rms_norm_bwd_fake(dy, x, rstd, weight, dresidual, emit_y):
    torch._check(dy.shape == x.shape and x.dim() == 2, lambda: "rms_norm_bwd: dy and x must be the same (N, d)")
    torch._check(rstd.shape == (x.shape[0],), lambda: "rms_norm_bwd: rstd must be (N,)")
    torch._check(dresidual is None or dresidual.shape == x.shape, lambda: "rms_norm_bwd: dresidual must be (N, d)")
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = x.new_empty(x.shape, dtype=out_dtype) if emit_y else x.new_empty((0,))
    return x.new_empty(x.shape), torch.empty_like(weight, memory_format=torch.contiguous_format), y


rms_norm_bwd = define(reference.rms_norm_bwd, fake=_rms_norm_bwd_fake)


def _setup_fwd(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.save_for_backward(x, rstd, weight)


def _backward_fwd(ctx, dy, _drstd):
    x, rstd, weight = ctx.saved_tensors
    dx, dw, _ = rms_norm_bwd(dy.contiguous(), x, rstd, weight, None, False)
    return dx, dw, None


rms_norm_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)
