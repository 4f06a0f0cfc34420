"""Fused FFN backward ops: the matmuls whose prologue/epilogue rebuild what the policy did not keep.

ffn_recompute(x1 (N, d), mean (N,), rstd (N,), ln_w (d,), ln_b (d,), w1 (H, d), b1 (H,), da (N, H), approximate)
    -> a (N, H), du (N, H) in da.dtype.   ffn/block policies: LN2 in the FC1 prologue, bias + GELU + GELU' * dA in its
    epilogue; u = LN2(x1) @ w1ᵀ + b1 never reaches memory.                                       FLOPs: 2·N·d·H
linear_gelu_bwd(dy (N, d), w2 (d, H), u (N, H), approximate) -> du = (dy @ w2) * gelu'(u)  (N, H) u.dtype
    pointwise policy: GELU' in the dA GEMM's epilogue.                                            FLOPs: 2·N·d·H
gelu_linear_wgrad(dy (N, d), u (N, H), approximate) -> dW2 = dyᵀ @ gelu(u)  (d, H) dy.dtype
    pointwise policy: GELU in the dW2 GEMM's prologue, a = gelu(u) never materialized.           FLOPs: 2·N·d·H
Weights may be strided views (e.g. a transposed Conv1D weight); kernels read them through their strides.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backend


@torch.library.custom_op("ckpt_ext::ffn_recompute", mutates_args=())
def ffn_recompute(
    x1: Tensor,
    mean: Tensor,
    rstd: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    w1: Tensor,
    b1: Tensor,
    da: Tensor,
    approximate: str,
) -> tuple[Tensor, Tensor]:
    return backend.kernel("ffn_recompute", x1.device.type)(x1, mean, rstd, ln_weight, ln_bias, w1, b1, da, approximate)


@ffn_recompute.register_fake
def _(x1, mean, rstd, ln_weight, ln_bias, w1, b1, da, approximate):
    n, d = x1.shape
    h = w1.shape[0]
    torch._check(w1.shape == (h, d), lambda: f"ffn_recompute: w1 must be (H, d={d}), got {tuple(w1.shape)}")
    torch._check(da.shape == (n, h), lambda: f"ffn_recompute: da must be (N, H) = ({n}, {h}), got {tuple(da.shape)}")
    torch._check(b1.shape == (h,), lambda: "ffn_recompute: b1 must be (H,)")
    return da.new_empty((n, h)), da.new_empty((n, h))


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

