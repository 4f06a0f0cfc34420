"""The ``cpp``/``cuda`` backends: route graph ops to the C++ extension's kernel ops (``ckpt_ext::<op>_kernel``).

Importing this module loads ckpt_ext._C (its TORCH_LIBRARY block declares the kernel ops' schemas) and registers a fake
kernel for each, reusing the graph op's fake, so the kernel ops pass opcheck and trace under FakeTensorMode too.
IMPLS maps graph-op name -> callable with the graph op's signature; attention (packed and grouped-query) runs
native_attention (aten's fused CPU kernel, or SDPA on CUDA tensors).
"""

from __future__ import annotations

import importlib
import warnings

import torch
from torch._library.custom_ops import CustomOpDef

from . import attention, cross_entropy, dropout, ffn, gelu, layer_norm, native_attention, rms_norm, rotary, swiglu

importlib.import_module("ckpt_ext._C")

_GRAPH_OPS: dict[str, CustomOpDef] = {
    "layer_norm_fwd": layer_norm.layer_norm_fwd,
    "layer_norm_bwd": layer_norm.layer_norm_bwd,
    "bias_gelu": gelu.bias_gelu,
    "gelu_bwd": gelu.gelu_bwd,
    "dropout_add": dropout.dropout_add,
    "ffn_recompute": ffn.ffn_recompute,
    "linear_bias_gelu": ffn.linear_bias_gelu,
    "linear_dropout_add": ffn.linear_dropout_add,
    "linear_gelu_bwd": ffn.linear_gelu_bwd,
    "gelu_linear_wgrad": ffn.gelu_linear_wgrad,
    "attention_fwd": attention.attention_fwd,
    "attention_bwd": attention.attention_bwd,
    "rms_norm_fwd": rms_norm.rms_norm_fwd,
    "rms_norm_bwd": rms_norm.rms_norm_bwd,
    "swiglu_fwd": swiglu.swiglu_fwd,
    "swiglu_bwd": swiglu.swiglu_bwd,
    "linear_swiglu": swiglu.linear_swiglu,
    "swiglu_linear_bwd": swiglu.swiglu_linear_bwd,
    "swiglu_linear_wgrad": swiglu.swiglu_linear_wgrad,
    "swiglu_ffn_recompute": swiglu.swiglu_ffn_recompute,
    "rope": rotary.rope,
    "linear_cross_entropy_fwd": cross_entropy.linear_cross_entropy_fwd,
    "linear_cross_entropy_bwd": cross_entropy.linear_cross_entropy_bwd,
}

IMPLS = {
    "attention_fwd": native_attention.attention_fwd,
    "attention_bwd": native_attention.attention_bwd,
    "gqa_attention_fwd": native_attention.gqa_attention_fwd,
    "gqa_attention_bwd": native_attention.gqa_attention_bwd,
}


def _signature(schema) -> list[tuple[str, str]]:
    """(name, type) of each argument and the return types: what must agree between a kernel op and its graph op."""
    return [(a.name, str(a.type)) for a in schema.arguments] + [("->", str(r.type)) for r in schema.returns]


KERNEL_OPS = []
STALE = []  # kernel ops built from an older schema than the graph op's: not routed (rebuild the extension)
for _name, _graph_op in _GRAPH_OPS.items():
    if hasattr(torch.ops.ckpt_ext, f"{_name}_kernel"):
        _kernel_op = getattr(torch.ops.ckpt_ext, f"{_name}_kernel").default
        if _signature(_kernel_op._schema) != _signature(_graph_op._opoverload._schema):
            warnings.warn(f"ckpt_ext._C's {_name}_kernel does not match ckpt_ext::{_name}'s schema (stale build?); "
                          f"{_name} runs the reference math until the extension is rebuilt", stacklevel=1)  # fmt: skip
            STALE.append(_name)
            continue
        torch.library.register_fake(f"ckpt_ext::{_name}_kernel", _graph_op._abstract_fn)
        IMPLS[_name] = _kernel_op
        KERNEL_OPS.append(_kernel_op)


# The CPU attention kernels native_attention's cpu_gqa route calls (helper ops with no graph op of their own).
if hasattr(torch.ops.ckpt_ext, "cpu_gqa_attention_bwd"):

    @torch.library.register_fake("ckpt_ext::cpu_gqa_attention_fwd")
    def _cpu_gqa_fwd_fake(q, k, v, causal, scale, segment_ids):
        b, t, h, dh = q.shape
        return q.new_empty(b, t, h, dh), q.new_empty(b, h, t)  # out (B, T, h, dh), lse (B, h, T)

    @torch.library.register_fake("ckpt_ext::cpu_gqa_attention_bwd")
    def _cpu_gqa_bwd_fake(dout, q, k, v, out, lse, causal, scale, segment_ids):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # dq, dk, dv


def _linear_dropout_add(x, w, b, residual, p, seed):
    """No GEMM epilogue hook on CPU: aten's addmm, then the C++ dropout + residual kernel (reference numerics)."""
    w = w if w.dtype == x.dtype else w.to(x.dtype)
    b = b if b is None or b.dtype == x.dtype else b.to(x.dtype)
    y = torch.nn.functional.linear(x, w, b)
    if p == 0.0 and y.dtype == residual.dtype:  # the kernel's fp32 add rounds to this dtype: an aten add, in place
        return y.add_(residual)
    return IMPLS["dropout_add"](y, residual, p, seed).to(residual.dtype)


if "dropout_add" in IMPLS and "linear_dropout_add" not in IMPLS:
    IMPLS["linear_dropout_add"] = _linear_dropout_add


def _outside_autocast(kernel_op):
    """A matmul-fused kernel op called with autocast off: the kernel's own at::mm calls would otherwise re-enter the
    dispatcher under the caller's autocast (the block's forward and backward run under the user's) and come back in
    the autocast dtype where the kernel allocated fp32 accumulators."""

    def call(*args):
        with torch.autocast(args[0].device.type, enabled=False):
            return kernel_op(*args)

    call.__wrapped__ = kernel_op
    return call


for _name in ("linear_swiglu", "swiglu_linear_bwd", "swiglu_linear_wgrad", "swiglu_ffn_recompute", "ffn_recompute",
              "linear_bias_gelu", "linear_gelu_bwd", "gelu_linear_wgrad", "linear_cross_entropy_fwd",
              "linear_cross_entropy_bwd"):  # fmt: skip
    if _name in IMPLS and _name not in STALE:
        IMPLS[_name] = _outside_autocast(IMPLS[_name])
