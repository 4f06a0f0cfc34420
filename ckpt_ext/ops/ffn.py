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

import torch

from .. import reference
from .dropout import dropout_add
from .table import define


def _ffn_recompute_flops(x1_shape, mean_shape, rstd_shape, lnw_shape, lnb_shape, w1_shape, *args, out_shape=None,
                         **kwargs) -> int:  # fmt: skip
    n, d = x1_shape
    return 4 * n * d * w1_shape[0]  # u = LN(x1) @ w1ᵀ and dA = dy @ w2


def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """2·N·K·out of x (N, K) @ w (out, K)ᵀ: linear_bias_gelu, linear_dropout_add."""
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]


def _dy_times_flops(dy_shape, second_shape, *args, out_shape=None, **kwargs) -> int:
    """2·N·d·H of a GEMM reducing over dy (N, d)'s rows or columns against a (., H) operand: linear_gelu_bwd (w2
    (d, H)), gelu_linear_wgrad (u (N, H)); the SwiGLU backward GEMMs alike."""
    return 2 * dy_shape[0] * dy_shape[1] * second_shape[1]


def _ffn_recompute_fake(x1, mean, rstd, ln_weight, ln_bias, w1, b1, dy, w2, approximate):
    n, d = x1.shape
    h = w1.shape[0]
    torch._check(w1.shape == (h, d), lambda: f"ffn_recompute: w1 must be (H, d={d}), got {tuple(w1.shape)}")
    torch._check(dy.shape == (n, d), lambda: f"ffn_recompute: dy must be (N, d) = ({n}, {d}), got {tuple(dy.shape)}")
    torch._check(w2.shape == (d, h), lambda: f"ffn_recompute: w2 must be (d, H) = ({d}, {h}), got {tuple(w2.shape)}")
    torch._check(b1.shape == (h,), lambda: "ffn_recompute: b1 must be (H,)")
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy.new_empty((n, h)), dy.new_empty((n, h)), dy.new_empty((h,), dtype=acc)


ffn_recompute = define(reference.ffn_recompute, fake=_ffn_recompute_fake, flops=_ffn_recompute_flops, autocast_off=True)


def _linear_bias_gelu_fake(x, w, b, approximate):
    torch._check(
        x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], lambda: "linear_bias_gelu: x (N, K), w (H, K)"
    )
    torch._check(b is None or b.shape == (w.shape[0],), lambda: "linear_bias_gelu: b must be (H,)")
    return x.new_empty((x.shape[0], w.shape[0]))


linear_bias_gelu = define(
    reference.linear_bias_gelu, fake=_linear_bias_gelu_fake, flops=_linear_flops, autocast_off=True
)


def _linear_gelu_bwd_fake(dy, w2, u, approximate):
    torch._check(dy.shape[1] == w2.shape[0] and w2.shape[1] == u.shape[1], lambda: "linear_gelu_bwd: shape mismatch")
    torch._check(dy.shape[0] == u.shape[0], lambda: "linear_gelu_bwd: dy and u must have the same rows")
    return u.new_empty(u.shape)


linear_gelu_bwd = define(
    reference.linear_gelu_bwd, fake=_linear_gelu_bwd_fake, flops=_dy_times_flops, autocast_off=True
)


def _gelu_linear_wgrad_fake(dy, u, approximate):
    torch._check(dy.shape[0] == u.shape[0], lambda: "gelu_linear_wgrad: dy and u must have the same rows")
    return dy.new_empty((dy.shape[1], u.shape[1]))


gelu_linear_wgrad = define(
    reference.gelu_linear_wgrad, fake=_gelu_linear_wgrad_fake, flops=_dy_times_flops, autocast_off=True
)


def _linear_dropout_add_fake(x, w, b, residual, p, seed):
    torch._check(
        x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], lambda: "linear_dropout_add: x (N, K), w (d, K)"
    )
    torch._check(residual.shape == (x.shape[0], w.shape[0]), lambda: "linear_dropout_add: residual must be (N, d)")
    torch._check(0.0 <= p < 1.0, lambda: f"linear_dropout_add: p must be in [0, 1), got {p}")
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


linear_dropout_add = define(reference.linear_dropout_add, fake=_linear_dropout_add_fake, flops=_linear_flops)


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
