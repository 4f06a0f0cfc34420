"""FLOP formulas of the ops that multiply matrices, for torch.utils.flop_counter.FlopCounterMode.

ffn_recompute: 4·N·d·H (FC1 and the dA GEMM); linear_bias_gelu, linear_dropout_add, linear_gelu_bwd and
gelu_linear_wgrad: 2·N·K·out.
linear_swiglu: 4·N·K·F; swiglu_linear_bwd, swiglu_linear_wgrad: 2·N·d·F; swiglu_ffn_recompute: 6·N·d·F.
attention_fwd: 4·B·h·T²·dh, attention_bwd: 10·B·h·T²·dh (torch's SDPA convention, causal not halved);
gqa_attention_fwd: 4·B·h·T·S·dh, gqa_attention_bwd: 10·B·h·T·S·dh (h query heads; GQA shares k/v, not FLOPs).
linear_cross_entropy_fwd: 2·N·V·d; linear_cross_entropy_bwd: 6·N·V·d (logits rebuilt, dhidden and dweight GEMMs;
4·N·V·d when the weight needs no gradient).

torch.utils.flop_counter imports triton when it is first imported, and ckpt_ext promises not to import triton at import
time. So the formulas are registered the moment torch.utils.flop_counter is imported by anyone (a post-import hook on
the meta path), or at once if it already is.
"""

from __future__ import annotations

import importlib.abc
import sys

import torch

_MODULE = "torch.utils.flop_counter"


def _bhtd(qkv_shape, n_heads):
    b, t, three_d = qkv_shape
    return b, n_heads, t, three_d // 3 // n_heads


def ffn_recompute_flops(x1_shape, mean_shape, rstd_shape, lnw_shape, lnb_shape, w1_shape, *args, out_shape=None,
                        **kwargs) -> int:  # fmt: skip
    n, d = x1_shape
    return 4 * n * d * w1_shape[0]  # u = LN(x1) @ w1ᵀ and dA = dy @ w2


def linear_bias_gelu_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]


linear_dropout_add_flops = linear_bias_gelu_flops  # 2·N·K·out for both epilogue-fused linears


def linear_gelu_bwd_flops(dy_shape, w2_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * dy_shape[0] * dy_shape[1] * w2_shape[1]


def gelu_linear_wgrad_flops(dy_shape, u_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * dy_shape[0] * dy_shape[1] * u_shape[1]


def linear_swiglu_flops(x_shape, w_gate_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * x_shape[0] * x_shape[1] * w_gate_shape[0]  # gate and up GEMMs


def swiglu_linear_bwd_flops(dy_shape, w_down_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * dy_shape[0] * dy_shape[1] * w_down_shape[1]


def swiglu_linear_wgrad_flops(dy_shape, g_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * dy_shape[0] * dy_shape[1] * g_shape[1]


def swiglu_ffn_recompute_flops(x1_shape, rstd_shape, nw_shape, w_gate_shape, *args, out_shape=None, **kwargs) -> int:
    n, d = x1_shape
    return 6 * n * d * w_gate_shape[0]  # gate and up GEMMs redone, dH = dy @ w_down


def attention_fwd_flops(qkv_shape, n_heads, *args, out_shape=None, **kwargs) -> int:
    b, h, t, dh = _bhtd(qkv_shape, n_heads)
    return 4 * b * h * t * t * dh


def attention_bwd_flops(dout_shape, qkv_shape, o_shape, lse_shape, n_heads, *args, out_shape=None, **kwargs) -> int:
    b, h, t, dh = _bhtd(qkv_shape, n_heads)
    return 10 * b * h * t * t * dh  # dV, dP, dQ, dK and the rebuilt scores, as torch counts SDPA's backward


def gqa_attention_fwd_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    b, t, h, dh = q_shape
    return 4 * b * h * t * k_shape[1] * dh


def gqa_attention_bwd_flops(dout_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    b, t, h, dh = q_shape
    return 10 * b * h * t * k_shape[1] * dh  # as attention_bwd: dV, dP, dQ, dK and the rebuilt scores


def linear_cross_entropy_fwd_flops(hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * hidden_shape[0] * hidden_shape[1] * weight_shape[0]


def linear_cross_entropy_bwd_flops(dloss_shape, hidden_shape, weight_shape, bias_shape, labels_shape, lse_shape,
                                   ignore_index, label_smoothing, chunk_bytes, need_dweight, out_shape=None,
                                   **kwargs) -> int:  # fmt: skip
    gemms = 3 if need_dweight else 2  # rebuilt logits, dhidden = dz @ W, dweight = dzᵀ @ hidden
    return 2 * gemms * hidden_shape[0] * hidden_shape[1] * weight_shape[0]


def _register() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    ops = torch.ops.ckpt_ext
    for packet, formula in (
        (ops.ffn_recompute, ffn_recompute_flops),
        (ops.linear_gelu_bwd, linear_gelu_bwd_flops),
        (ops.linear_bias_gelu, linear_bias_gelu_flops),
        (ops.linear_dropout_add, linear_dropout_add_flops),
        (ops.gelu_linear_wgrad, gelu_linear_wgrad_flops),
        (ops.linear_swiglu, linear_swiglu_flops),
        (ops.swiglu_linear_bwd, swiglu_linear_bwd_flops),
        (ops.swiglu_linear_wgrad, swiglu_linear_wgrad_flops),
        (ops.swiglu_ffn_recompute, swiglu_ffn_recompute_flops),
        (ops.attention_fwd, attention_fwd_flops),
        (ops.attention_bwd, attention_bwd_flops),
        (ops.gqa_attention_fwd, gqa_attention_fwd_flops),
        (ops.gqa_attention_bwd, gqa_attention_bwd_flops),
        (ops.linear_cross_entropy_fwd, linear_cross_entropy_fwd_flops),
        (ops.linear_cross_entropy_bwd, linear_cross_entropy_bwd_flops),
    ):
        if packet not in flop_registry:
            register_flop_formula(packet)(formula)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds torch.utils.flop_counter through the normal finders, then registers our formulas once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            _register()

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if _MODULE in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
