"""The MLP segment: norm2 → first linear(s) → activation → down projection + dropout + residual, and its backward.

Forms (``BlockSpec.mlp``; H = hidden width, y2 = norm2(x1) (N, d)):
    gelu, gelu_tanh   u = y2 W_fcᵀ + b           a = gelu(u)               (pre-activations: (u,))
    swiglu            g, u = y2 W_gateᵀ, y2 W_upᵀ  a = silu(g) · u          (pre-activations: (g, u))
    geglu             g, u as swiglu              a = gelu_tanh(g) · u      (Gemma; geglu_erf: erf gelu, ModernBERT)
    out = linear_dropout_add(a, W_fc2, b_fc2, x1, p, seed + 2)   (bias, dropout, residual in the GEMM epilogue)
``ACTIVATIONS`` holds each form's pointwise forward and backward op; ``FUSED`` the forms with fused kernels:
the activation in FC1's epilogue (forward without keeping u), the activation' in the down projection's backward
(pointwise policy) and norm2 → FC1 rebuilt beside dA = dY·W_down on one tile (ffn / block policies). A form or a norm
without a fused kernel (GeGLU; a norm the recompute kernel does not read) and LoRA on the MLP's linears run the same
math from the pointwise ops (``_backward_composed``): what the policy keeps is the same; it is rebuilt by several ops
instead of one kernel.

Saved tensors (policies.py names): ln2_stats, ln2_out, fc1_out (the pre-activations, a tuple), act_out.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import lora
from ..policies import get_policy
from .common import AutocastState, bias_or_zeros
from .dispatch import block_ops as _ops
from .lora_terms import input_grads, lora_add, lora_on, lora_residual, weight_grads, with_input_grad
from .norm import ln_params, norm_fwd


class Activation(NamedTuple):
    fwd: Callable  # (pre-activations, spec) -> a (N, H)
    bwd: Callable  # (dA (N, H), pre-activations, spec) -> gradients of the pre-activations


def _gelu_fwd(pre, spec):
    return _ops.bias_gelu(pre[0], None, spec.approximate)


def _gelu_bwd(da, pre, spec):
    return (_ops.gelu_bwd(da, pre[0], spec.approximate),)


def _geglu_erf_fwd(pre, spec):
    """gelu(g)·u with the erf GELU (ModernBERT's default), from the GELU op: (g, u) (N, H) each -> (N, H)."""
    g, u = pre
    return _ops.bias_gelu(g, None, "none") * u


def _geglu_erf_bwd(da, pre, spec):
    """dg = gelu'(g)·(dA·u), du = dA·gelu(g), from the GELU ops."""
    g, u = pre
    return _ops.gelu_bwd(da * u, g, "none"), da * _ops.bias_gelu(g, None, "none")


ACTIVATIONS = {
    "gelu": Activation(_gelu_fwd, _gelu_bwd),
    "gelu_tanh": Activation(_gelu_fwd, _gelu_bwd),
    "swiglu": Activation(lambda pre, spec: _ops.swiglu_fwd(*pre), lambda da, pre, spec: _ops.swiglu_bwd(da, *pre)),
    "geglu": Activation(lambda pre, spec: _ops.geglu_fwd(*pre), lambda da, pre, spec: _ops.geglu_bwd(da, *pre)),
    "geglu_erf": Activation(_geglu_erf_fwd, _geglu_erf_bwd),
}
FUSED = {"gelu": "layernorm", "gelu_tanh": "layernorm", "swiglu": "rmsnorm"}  # form -> the norm its recompute reads


def saves(spec) -> dict[str, int]:
    """Tensor count of each name this segment can save (policies.py names)."""
    return {"ln2_stats": spec.n_stats(), "ln2_out": 1, "fc1_out": 2 if spec.gated else 1, "act_out": 1, "h2": 1}


def input_norm(acts: dict, spec) -> tuple[str, str, str, str]:
    """Keys of the norm in front of the MLP: (its input, its statistics, its parameter prefix, its output). pre-LN:
    norm2 of x1 (output ln2_out); post-LN: norm1 of h1, whose output x1 is the MLP input."""
    if spec.placement == "post":
        return "h1", "ln1_stats", "ln1", "x1"
    return "x1", "ln2_stats", "ln2", "ln2_out"


def first_linears(y2: Tensor, p: dict, cfg) -> tuple[Tensor, ...]:
    """The MLP's pre-activations with their LoRA updates: (u,) or (g, u), each (N, H)."""
    return tuple(lora_add(F.linear(y2, p[f"w_{s}"], p[f"b_{s}"]), y2, p, cfg, s) for s in cfg.spec.first_linears())


def ffn_half(x1: Tensor, p: dict, cfg) -> tuple[Tensor, dict]:
    """x1 (N, d) -> out (N, d) and ln2_out, ln2_stats, fc1_out (if the policy keeps it), act_out (N, H).

    Policies that do not keep the pre-activations run the first matmul(s) with the activation in the epilogue where
    the form has that kernel, so u (or g and u) are never written."""
    spec = cfg.spec
    ac = AutocastState(x1.device.type)
    post = spec.placement == "post"
    if post:  # x1 = norm1(h1) is already the MLP input; norm2 follows the residual add
        y2, acts = x1, {}
    else:
        y2, s2 = norm_fwd(x1, p, "ln2", cfg)
        acts = {"ln2_out": y2, "ln2_stats": s2}
    keep_pre = "fc1_out" in get_policy(cfg.policy, spec.placement).keeps
    if keep_pre or spec.mlp not in FUSED or lora_on(cfg, spec.first_linears()):  # LoRA joins before the activation
        pre = first_linears(y2, p, cfg)  # (u,) or (g, u), each (N, H)
        a = ACTIVATIONS[spec.mlp].fwd(pre, spec)
        if keep_pre:
            acts["fc1_out"] = pre
    elif spec.gated:
        a = _ops.linear_swiglu(ac.mm(y2), ac.mm(p["w_gate"]), ac.mm(p["b_gate"]), ac.mm(p["w_up"]),
                              ac.mm(p["b_up"]))  # fmt: skip
    else:
        a = _ops.linear_bias_gelu(ac.mm(y2), ac.mm(p["w_fc"]), ac.mm(p["b_fc"]), spec.approximate)  # (N, H)
    acts["act_out"] = a
    residual = lora_residual(x1, a, p, cfg, "fc2", cfg.seed + 2)
    out = _ops.linear_dropout_add(ac.mm(a), ac.mm(p["w_fc2"]), ac.mm(p["b_fc2"]), residual, cfg.dropout, cfg.seed + 2)
    if post:
        acts["h2"] = out
        out, acts["ln2_stats"] = norm_fwd(out, p, "ln2", cfg)
    return out, acts


def mlp_backward(dfm: Tensor, acts: dict, p: dict, cfg, ac: AutocastState, g: dict, want):
    """The activation and down-projection backward: [(weight, bias, dZ)] of the first matmul(s). dW_down (and the
    recompute kernels' db1) only where ``want`` has it. Which kernel runs follows from what was kept: act_out (none),
    fc1_out only (pointwise), neither (rebuilt from x1 and norm2's statistics)."""
    spec = cfg.spec
    pre = acts.get("fc1_out")
    fused = FUSED.get(spec.mlp) == spec.norm if pre is None else spec.mlp in FUSED  # the kernel this case needs
    if lora_on(cfg, lora.MLP_TARGETS) or not fused:
        return _backward_composed(dfm, acts, p, cfg, g, want)
    need_w2 = "w_fc2" in want
    if pre is not None and "act_out" in acts:  # everything kept: dA = dY·W_down, then the activation's backward
        dpre = ACTIVATIONS[spec.mlp].bwd(torch.matmul(dfm, p["w_fc2"]), pre, spec)
        if need_w2:
            g["w_fc2"] = torch.matmul(dfm.t(), acts["act_out"])
    elif pre is not None:  # pre-activations kept: act and act' live in the down projection's kernels
        dpre, w2 = _pointwise_backward(dfm, pre, p, spec, ac, need_w2)
        if need_w2:
            g["w_fc2"] = w2
    else:
        return _recompute_backward(dfm, acts, p, cfg, ac, g, want)
    return list(zip(_weights(spec), _biases(spec), dpre))


def _weights(spec) -> tuple[str, ...]:
    return tuple(f"w_{s}" for s in spec.first_linears())


def _biases(spec) -> tuple[str, ...]:
    return tuple(f"b_{s}" for s in spec.first_linears())


def _pointwise_backward(dfm, pre, p: dict, spec, ac: AutocastState, need_w2: bool):
    """(dpre, dW_down or None) with the activation rebuilt in the down projection's prologue/epilogue."""
    if spec.gated:
        dpre = _ops.swiglu_linear_bwd(dfm, ac.mm(p["w_fc2"]), *pre)
        return dpre, _ops.swiglu_linear_wgrad(dfm, *pre) if need_w2 else None
    du = _ops.linear_gelu_bwd(dfm, ac.mm(p["w_fc2"]), pre[0], spec.approximate)
    return (du,), _ops.gelu_linear_wgrad(dfm, pre[0], spec.approximate) if need_w2 else None


def _recompute_backward(dfm, acts: dict, p: dict, cfg, ac: AutocastState, g: dict, want):
    """The MLP's norm → FC1 (or gate/up) → activation rebuilt beside dA = dY·W_down in one kernel."""
    spec = cfg.spec
    x_key, stats_key, which, _ = input_norm(acts, spec)
    x1 = acts[x_key]
    if spec.gated:
        (r2,) = acts[stats_key]
        a, dg, du = _ops.swiglu_ffn_recompute(x1, r2, p[f"{which}_w"], ac.mm(p["w_gate"]), ac.mm(p["b_gate"]),
                                             ac.mm(p["w_up"]), ac.mm(p["b_up"]), dfm, ac.mm(p["w_fc2"]))  # fmt: skip
        out = [("w_gate", "b_gate", dg), ("w_up", "b_up", du)]
    else:
        m2, r2 = acts[stats_key]
        ln2_w, ln2_b = ln_params(p[f"{which}_w"], p[f"{which}_b"], x1.shape[1], x1, spec)
        b1 = ac.mm(bias_or_zeros(p["b_fc"], p["w_fc"]))
        a, du, db1 = _ops.ffn_recompute(x1, m2, r2, ln2_w, ln2_b, ac.mm(p["w_fc"]), b1, dfm, ac.mm(p["w_fc2"]),
                                       spec.approximate)  # fmt: skip
        if "b_fc" in want:
            g["b_fc"] = db1.to(p["b_fc"].dtype)
        out = [("w_fc", None, du)]
    if "w_fc2" in want:
        g["w_fc2"] = torch.matmul(dfm.t(), a)
    return out


def _backward_composed(dfm: Tensor, acts: dict, p: dict, cfg, g: dict, want):
    """The MLP backward from pointwise ops: any norm × form, and LoRA on the MLP's linears (the fused kernels have no
    low-rank term). Policies without fc1_out rebuild norm2 → first linear(s) (with LoRA) here, as their table says,
    then dA = dY·W_down + LoRA's input gradient and the activation's backward."""
    spec = cfg.spec
    pre = acts.get("fc1_out")
    if pre is None:  # rebuild the pre-activations from the MLP's input (its norm replayed)
        x_key, _, which, out_key = input_norm(acts, spec)
        if out_key not in acts:
            acts[out_key] = norm_fwd(acts[x_key], p, which, cfg)[0]  # the norm's backward need not emit it again
        pre = first_linears(acts[out_key], p, cfg)
    act = ACTIVATIONS[spec.mlp]
    a: Optional[Tensor] = acts["act_out"] if "act_out" in acts else act.fwd(pre, spec)  # (N, H)
    if "w_fc2" in want:
        g["w_fc2"] = torch.matmul(dfm.t(), a)
    extra, pending = input_grads([("fc2", dfm)], p, cfg)
    da = with_input_grad(torch.matmul(dfm, p["w_fc2"]), extra)  # (N, H)
    weight_grads(pending, a, p, cfg, g, want)
    del a
    return list(zip(_weights(spec), _biases(spec), act.bwd(da, pre, spec)))
