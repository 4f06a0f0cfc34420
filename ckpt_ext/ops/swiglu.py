"""SwiGLU ops of the Llama-family MLP, ``down(silu(gate(n)) · up(n))``, plain and fused into the matmuls around them.

swiglu_fwd(g (N, F), u (N, F)) -> h = silu(g)·u (N, F) g.dtype
swiglu_bwd(dh, g, u) -> dg = dh·u·silu'(g), du = dh·silu(g)   silu'(g) = σ(g)(1 + g(1 - σ(g)))
linear_swiglu(x (N, K), w_gate (F, K), b_gate?, w_up (F, K), b_up?) -> h (N, F) x.dtype
    ffn/block forward: gate and up GEMMs on one output tile, SwiGLU in the epilogue; g and u never written.
                                                                                                  FLOPs: 4·N·K·F
swiglu_linear_bwd(dy (N, d), w_down (d, F), g, u) -> dg, du
    pointwise policy: dH = dy @ w_down with dg, du in its epilogue; dH never written.            FLOPs: 2·N·d·F
swiglu_linear_wgrad(dy (N, d), g, u) -> dW_down = dyᵀ @ h (d, F) dy.dtype
    pointwise policy: h rebuilt in the GEMM prologue.                                            FLOPs: 2·N·d·F
swiglu_ffn_recompute(x1 (N, d), rstd (N,), norm_w (d,), w_gate, b_gate?, w_up, b_up?, dy (N, d), w_down (d, F))
    -> h, dg, du (N, F) dy.dtype
    ffn/block backward: RMSNorm2 in the prologue, the gate, up and dH GEMMs (all reduce over d) on one output tile,
    epilogue writes h (for dW_down), dg and du; n, g, u and dH never reach memory.               FLOPs: 6·N·d·F
fp32 accumulation and pointwise math everywhere. Weights may be strided views. Math: reference.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend


def _check_pair(name: str, a: Tensor, b: Tensor) -> None:
    torch._check(a.dim() == 2 and a.shape == b.shape, lambda: f"{name}: g and u must be the same (N, F)")


@torch.library.custom_op("ckpt_ext::swiglu_fwd", mutates_args=())
def swiglu_fwd(g: Tensor, u: Tensor) -> Tensor:
    return backend.kernel("swiglu_fwd", g.device.type)(g, u)


@swiglu_fwd.register_fake
def _(g, u):
    _check_pair("swiglu_fwd", g, u)
    return g.new_empty(g.shape)


@torch.library.custom_op("ckpt_ext::swiglu_bwd", mutates_args=())
def swiglu_bwd(dh: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    return backend.kernel("swiglu_bwd", g.device.type)(dh, g, u)


@swiglu_bwd.register_fake
def _(dh, g, u):
    _check_pair("swiglu_bwd", g, u)
    torch._check(dh.shape == g.shape, lambda: "swiglu_bwd: dh must match g")
    return g.new_empty(g.shape), u.new_empty(u.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dh):
    g, u = ctx.saved_tensors
    return swiglu_bwd(dh.contiguous(), g, u)


swiglu_fwd.register_autograd(_backward, setup_context=_setup)


def _check_weights(name: str, k: int, w_gate: Tensor, b_gate, w_up: Tensor, b_up) -> int:
    f = w_gate.shape[0]
    torch._check(w_gate.dim() == 2 and w_gate.shape[1] == k, lambda: f"{name}: w_gate must be (F, {k})")
    torch._check(w_up.shape == w_gate.shape, lambda: f"{name}: w_up must be the same (F, {k}) as w_gate")
    for bname, b in (("b_gate", b_gate), ("b_up", b_up)):
        torch._check(b is None or b.shape == (f,), lambda bname=bname: f"{name}: {bname} must be ({f},)")
    return f


@torch.library.custom_op("ckpt_ext::linear_swiglu", mutates_args=())
def linear_swiglu(x: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor]) -> Tensor:
    return backend.kernel("linear_swiglu", x.device.type)(x, w_gate, b_gate, w_up, b_up)


@linear_swiglu.register_fake
def _(x, w_gate, b_gate, w_up, b_up):
    torch._check(x.dim() == 2, lambda: "linear_swiglu: x must be (N, K)")
    f = _check_weights("linear_swiglu", x.shape[1], w_gate, b_gate, w_up, b_up)
    return x.new_empty((x.shape[0], f))


@torch.library.custom_op("ckpt_ext::swiglu_linear_bwd", mutates_args=())
def swiglu_linear_bwd(dy: Tensor, w_down: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    return backend.kernel("swiglu_linear_bwd", g.device.type)(dy, w_down, g, u)


@swiglu_linear_bwd.register_fake
def _(dy, w_down, g, u):
    _check_pair("swiglu_linear_bwd", g, u)
    n, f = g.shape
    torch._check(dy.dim() == 2 and dy.shape[0] == n, lambda: f"swiglu_linear_bwd: dy must be ({n}, d)")
    torch._check(w_down.shape == (dy.shape[1], f), lambda: f"swiglu_linear_bwd: w_down must be (d, {f})")
    return g.new_empty(g.shape), u.new_empty(u.shape)


@torch.library.custom_op("ckpt_ext::swiglu_linear_wgrad", mutates_args=())
def swiglu_linear_wgrad(dy: Tensor, g: Tensor, u: Tensor) -> Tensor:
    return backend.kernel("swiglu_linear_wgrad", g.device.type)(dy, g, u)


@swiglu_linear_wgrad.register_fake
def _(dy, g, u):
    _check_pair("swiglu_linear_wgrad", g, u)
    torch._check(dy.dim() == 2 and dy.shape[0] == g.shape[0], lambda: "swiglu_linear_wgrad: dy must be (N, d)")
    return dy.new_empty((dy.shape[1], g.shape[1]))


@torch.library.custom_op("ckpt_ext::swiglu_ffn_recompute", mutates_args=())
def swiglu_ffn_recompute(
    x1: Tensor,
    rstd: Tensor,
    norm_weight: Tensor,
    w_gate: Tensor,
    b_gate: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    dy: Tensor,
    w_down: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return backend.kernel("swiglu_ffn_recompute", x1.device.type)(
        x1, rstd, norm_weight, w_gate, b_gate, w_up, b_up, dy, w_down
    )


@swiglu_ffn_recompute.register_fake
def _(x1, rstd, norm_weight, w_gate, b_gate, w_up, b_up, dy, w_down):
    torch._check(x1.dim() == 2, lambda: "swiglu_ffn_recompute: x1 must be (N, d)")
    n, d = x1.shape
    f = _check_weights("swiglu_ffn_recompute", d, w_gate, b_gate, w_up, b_up)
    torch._check(rstd.shape == (n,) and norm_weight.shape == (d,), lambda: "swiglu_ffn_recompute: rstd (N,), norm (d,)")
    torch._check(dy.shape == (n, d), lambda: f"swiglu_ffn_recompute: dy must be ({n}, {d})")
    torch._check(w_down.shape == (d, f), lambda: f"swiglu_ffn_recompute: w_down must be ({d}, {f})")
    return dy.new_empty((n, f)), dy.new_empty((n, f)), dy.new_empty((n, f))
