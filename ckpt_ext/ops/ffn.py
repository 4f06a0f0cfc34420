"""Fused FFN backward ops: the matmuls whose prologue/epilogue rebuild what the policy did not keep.

ffn_recompute(x1 (N, d), mean (N,), rstd (N,), ln_w (d,), ln_b (d,), w1 (H, d), b1 (H,), dy (N, d), w2 (d, H),
              approximate) -> a (N, H), du (N, H) in dy.dtype, db1 (H,) fp32
    ffn/block policies: two GEMMs on one output tile (both reduce over d): u = LN2(x1) @ w1ᵀ + b1 with LN2 in the
    prologue, and dA = dy @ w2; epilogue a = gelu(u), du = gelu'(u) * dA and db1's partial column sums. Neither u
    nor dA reaches memory.                                                                        FLOPs: 4·N·d·H
linear_dropout_add(x (N, K), w (d, K), b (d,)?, residual (N, d), p, seed) -> residual + dropout(x @ wᵀ + b)
    (N, d) residual.dtype: bias, hash-mask dropout and the residual add in the GEMM epilogue (attention proj, FC2);
    the projection output never reaches memory.                                                   FLOPs: 2·N·K·d
linear_bias_gelu(x (N, K), w (H, K), b (H,)?, approximate) -> gelu(x @ wᵀ + b) (N, H) x.dtype
    ffn/block forward: bias + GELU in FC1's epilogue; u is not kept by these policies, so it is never written.
                                                                                                  FLOPs: 2·N·K·H
linear_gelu_bwd(dy (N, d), w2 (d, H), u (N, H), approximate) -> du = (dy @ w2) * gelu'(u)  (N, H) u.dtype
    pointwise policy: GELU' in the dA GEMM's epilogue.                                            FLOPs: 2·N·d·H
gelu_linear_wgrad(dy (N, d), u (N, H), approximate) -> dW2 = dyᵀ @ gelu(u)  (d, H) dy.dtype
    pointwise policy: GELU in the dW2 GEMM's prologue, a = gelu(u) never materialized.           FLOPs: 2·N·d·H
Weights may be strided views (e.g. a transposed Conv1D weight); kernels read them through their strides.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from .dropout import dropout_add


@torch.library.custom_op("ckpt_ext::ffn_recompute", mutates_args=())
def ffn_recompute(
    x1: Tensor,
    mean: Tensor,
    rstd: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    w1: Tensor,
    b1: Tensor,
    dy: Tensor,
    w2: Tensor,
    approximate: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return backend.kernel("ffn_recompute", x1.device.type)(
        x1, mean, rstd, ln_weight, ln_bias, w1, b1, dy, w2, approximate
    )


@ffn_recompute.register_fake
def _(x1, mean, rstd, ln_weight, ln_bias, w1, b1, dy, w2, approximate):
    n, d = x1.shape
    h = w1.shape[0]
    torch._check(w1.shape == (h, d), lambda: f"ffn_recompute: w1 must be (H, d={d}), got {tuple(w1.shape)}")
    torch._check(dy.shape == (n, d), lambda: f"ffn_recompute: dy must be (N, d) = ({n}, {d}), got {tuple(dy.shape)}")
    torch._check(w2.shape == (d, h), lambda: f"ffn_recompute: w2 must be (d, H) = ({d}, {h}), got {tuple(w2.shape)}")
    torch._check(b1.shape == (h,), lambda: "ffn_recompute: b1 must be (H,)")
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy.new_empty((n, h)), dy.new_empty((n, h)), dy.new_empty((h,), dtype=acc)


@torch.library.custom_op("ckpt_ext::linear_bias_gelu", mutates_args=())
def linear_bias_gelu(x: Tensor, w: Tensor, b: Optional[Tensor], approximate: str) -> Tensor:
    return backend.kernel("linear_bias_gelu", x.device.type)(x, w, b, approximate)


@linear_bias_gelu.register_fake
def _(x, w, b, approximate):
    torch._check(
        x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], lambda: "linear_bias_gelu: x (N, K), w (H, K)"
    )
    torch._check(b is None or b.shape == (w.shape[0],), lambda: "linear_bias_gelu: b must be (H,)")
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("ckpt_ext::linear_gelu_bwd", mutates_args=())
def linear_gelu_bwd(dy: Tensor, w2: Tensor, u: Tensor, approximate: str) -> Tensor:
    return backend.kernel("linear_gelu_bwd", u.device.type)(dy, w2, u, approximate)


@linear_gelu_bwd.register_fake
def _(dy, w2, u, approximate):
    torch._check(dy.shape[1] == w2.shape[0] and w2.shape[1] == u.shape[1], lambda: "linear_gelu_bwd: shape mismatch")
    torch._check(dy.shape[0] == u.shape[0], lambda: "linear_gelu_bwd: dy and u must have the same rows")
    return u.new_empty(u.shape)


@torch.library.custom_op("ckpt_ext::gelu_linear_wgrad", mutates_args=())
def gelu_linear_wgrad(dy: Tensor, u: Tensor, approximate: str) -> Tensor:
    return backend.kernel("gelu_linear_wgrad", u.device.type)(dy, u, approximate)


@gelu_linear_wgrad.register_fake
def _(dy, u, approximate):
    torch._check(dy.shape[0] == u.shape[0], lambda: "gelu_linear_wgrad: dy and u must have the same rows")
    return dy.new_empty((dy.shape[1], u.shape[1]))


@torch.library.custom_op("ckpt_ext::linear_dropout_add", mutates_args=())
def linear_dropout_add(x: Tensor, w: Tensor, b: Optional[Tensor], residual: Tensor, p: float, seed: int) -> Tensor:
    return backend.kernel("linear_dropout_add", x.device.type)(x, w, b, residual, p, seed)


@linear_dropout_add.register_fake
def _(x, w, b, residual, p, seed):
    torch._check(
        x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], lambda: "linear_dropout_add: x (N, K), w (d, K)"
    )
    torch._check(residual.shape == (x.shape[0], w.shape[0]), lambda: "linear_dropout_add: residual must be (N, d)")
    torch._check(0.0 <= p < 1.0, lambda: f"linear_dropout_add: p must be in [0, 1), got {p}")
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


def _setup_linear_dropout_add(ctx, inputs, output):
    x, w, b, residual, p, seed = inputs
    ctx.p, ctx.seed, ctx.has_bias = p, seed, b is not None
    ctx.save_for_backward(x, w)


def _backward_linear_dropout_add(ctx, grad):
    """d residual = grad; d (x wᵀ + b) = dropout_add(grad) with the same mask; then the linear layer's VJP."""
    x, w = ctx.saved_tensors
    grad = grad.contiguous()
    dlin = dropout_add(grad, None, ctx.p, ctx.seed) if ctx.p > 0.0 else grad
    dlin = dlin.to(x.dtype)
    db = dlin.sum(dim=0).to(w.dtype) if ctx.has_bias else None
    return dlin @ w.to(x.dtype), (dlin.t() @ x).to(w.dtype), db, grad, None, None


linear_dropout_add.register_autograd(_backward_linear_dropout_add, setup_context=_setup_linear_dropout_add)
