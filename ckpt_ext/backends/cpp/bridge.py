"""The ``cpp``/``cuda`` backends' table: each graph op routed to the extension's kernel op ``ckpt_ext::<op>_kernel``.

Importing this module loads ckpt_ext._C (csrc/ckpt_ext.cpp declares the kernel ops' schemas: the op table's, checked
by tests/test_op_schemas.py) and gives each kernel op its graph op's fake (the op table's), so the kernel ops pass
opcheck and trace under FakeTensorMode too. IMPLS maps graph-op name -> callable with the graph op's signature: the
kernel op itself, called with autocast off where the table says so (``autocast_off``: its own at::mm calls would
otherwise re-enter the dispatcher under the caller's autocast and come back in the autocast dtype where the kernel
allocated fp32 accumulators); linear_dropout_add composed from aten's addmm and the dropout kernel; attention (packed
and grouped-query) from ckpt_ext/backends/aten_attention.py.
"""

from __future__ import annotations

import importlib

import torch

from ... import ops
from .. import aten_attention

importlib.import_module("ckpt_ext._C")

IMPLS = {
    "attention_fwd": aten_attention.attention_fwd,
    "attention_bwd": aten_attention.attention_bwd,
    "gqa_attention_fwd": aten_attention.gqa_attention_fwd,
    "gqa_attention_bwd": aten_attention.gqa_attention_bwd,
}


def _outside_autocast(kernel_op):
    def call(*args):
        with torch.autocast(args[0].device.type, enabled=False):
            return kernel_op(*args)

    call.__wrapped__ = kernel_op
    return call


KERNEL_OPS = []
for _name, _spec in ops.table.OPS.items():
    if hasattr(torch.ops.ckpt_ext, f"{_name}_kernel"):
        _kernel_op = getattr(torch.ops.ckpt_ext, f"{_name}_kernel").default
        torch.library.register_fake(f"ckpt_ext::{_name}_kernel", _spec.fake)
        IMPLS[_name] = _outside_autocast(_kernel_op) if _spec.autocast_off else _kernel_op
        KERNEL_OPS.append(_kernel_op)


@torch.library.register_fake("ckpt_ext::cpu_gqa_attention_fwd")
def _cpu_gqa_fwd_fake(q, k, v, causal, scale, segment_ids, window=0):
    b, t, h, dh = q.shape
    return q.new_empty(b, t, h, dh), q.new_empty(b, h, t)  # out (B, T, h, dh), lse (B, h, T)


@torch.library.register_fake("ckpt_ext::cpu_gqa_attention_bwd")
def _cpu_gqa_bwd_fake(dout, q, k, v, out, lse, causal, scale, segment_ids, window=0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # dq, dk, dv


def _linear_dropout_add(x, w, b, residual, p, seed):
    """No GEMM epilogue hook on CPU: aten's addmm, then the C++ dropout + residual kernel (reference numerics)."""
    w = w if w.dtype == x.dtype else w.to(x.dtype)
    b = b if b is None or b.dtype == x.dtype else b.to(x.dtype)
    y = torch.nn.functional.linear(x, w, b)
    if p == 0.0 and y.dtype == residual.dtype:  # the kernel's fp32 add rounds to this dtype: an aten add, in place
        return y.add_(residual)
    return IMPLS["dropout_add"](y, residual, p, seed).to(residual.dtype)


IMPLS.setdefault("linear_dropout_add", _linear_dropout_add)
