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

import torch
from torch import Tensor

from .. import reference
from .ffn import _dy_times_flops
from .gated import check_pair, define_gated
from .table import define


def _linear_swiglu_flops(x_shape, w_gate_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * x_shape[0] * x_shape[1] * w_gate_shape[0]  # gate and up GEMMs


def _swiglu_ffn_recompute_flops(x1_shape, rstd_shape, nw_shape, w_gate_shape, *args, out_shape=None, **kwargs) -> int:
    n, d = x1_shape
    return 6 * n * d * w_gate_shape[0]  # gate and up GEMMs redone, dH = dy @ w_down


swiglu_fwd, swiglu_bwd = define_gated(reference.swiglu_fwd, reference.swiglu_bwd)


def _check_weights(name: str, k: int, w_gate: Tensor, b_gate, w_up: Tensor, b_up) -> int:
    f = w_gate.shape[0]
    torch._check(w_gate.dim() == 2 and w_gate.shape[1] == k, lambda: f"{name}: w_gate must be (F, {k})")
    torch._check(w_up.shape == w_gate.shape, lambda: f"{name}: w_up must be the same (F, {k}) as w_gate")
    for bname, b in (("b_gate", b_gate), ("b_up", b_up)):
        torch._check(b is None or b.shape == (f,), lambda bname=bname: f"{name}: {bname} must be ({f},)")
    return f


def _linear_swiglu_fake(x, w_gate, b_gate, w_up, b_up):
    torch._check(x.dim() == 2, lambda: "linear_swiglu: x must be (N, K)")
    f = _check_weights("linear_swiglu", x.shape[1], w_gate, b_gate, w_up, b_up)
    return x.new_empty((x.shape[0], f))


linear_swiglu = define(reference.linear_swiglu, fake=_linear_swiglu_fake, flops=_linear_swiglu_flops, autocast_off=True)


def _swiglu_linear_bwd_fake(dy, w_down, g, u):
    check_pair("swiglu_linear_bwd", g, u)
    n, f = g.shape
    torch._check(dy.dim() == 2 and dy.shape[0] == n, lambda: f"swiglu_linear_bwd: dy must be ({n}, d)")
    torch._check(w_down.shape == (dy.shape[1], f), lambda: f"swiglu_linear_bwd: w_down must be (d, {f})")
    return g.new_empty(g.shape), u.new_empty(u.shape)


swiglu_linear_bwd = define(
    reference.swiglu_linear_bwd, fake=_swiglu_linear_bwd_fake, flops=_dy_times_flops, autocast_off=True
)


def _swiglu_linear_wgrad_fake(dy, g, u):
    check_pair("swiglu_linear_wgrad", g, u)
    torch._check(dy.dim() == 2 and dy.shape[0] == g.shape[0], lambda: "swiglu_linear_wgrad: dy must be (N, d)")
    return dy.new_empty((dy.shape[1], g.shape[1]))


swiglu_linear_wgrad = define(
    reference.swiglu_linear_wgrad, fake=_swiglu_linear_wgrad_fake, flops=_dy_times_flops, autocast_off=True
)


def _swiglu_ffn_recompute_fake(x1, rstd, norm_weight, w_gate, b_gate, w_up, b_up, dy, w_down):
    torch._check(x1.dim() == 2, lambda: "swiglu_ffn_recompute: x1 must be (N, d)")
    n, d = x1.shape
    f = _check_weights("swiglu_ffn_recompute", d, w_gate, b_gate, w_up, b_up)
    torch._check(rstd.shape == (n,) and norm_weight.shape == (d,), lambda: "swiglu_ffn_recompute: rstd (N,), norm (d,)")
    torch._check(dy.shape == (n, d), lambda: f"swiglu_ffn_recompute: dy must be ({n}, {d})")
    torch._check(w_down.shape == (d, f), lambda: f"swiglu_ffn_recompute: w_down must be ({d}, {f})")
    return dy.new_empty((n, f)), dy.new_empty((n, f)), dy.new_empty((n, f))


swiglu_ffn_recompute = define(
    reference.swiglu_ffn_recompute,
    fake=_swiglu_ffn_recompute_fake,
    flops=_swiglu_ffn_recompute_flops,
    autocast_off=True,
)
