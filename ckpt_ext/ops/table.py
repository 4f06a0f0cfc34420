"""The op table: one row per ``ckpt_ext::*`` graph op, written once, read by everything that needs to know an op.

A row (``OpSpec``) holds what makes the op: its reference math (ckpt_ext.reference / reference_attention: the
function's annotated signature *is* the op's schema, inferred once here), the fake kernel (shapes and dtypes, argument
checks), an optional eager check run before any kernel, the FLOP formula (matmul ops; registered by ops/flops.py) and
the autocast rule (``autocast_off=True``: the kernel runs GEMMs of its own, so a backend calls it with autocast off;
the caller casts its inputs). ``define`` registers the graph op with torch.library and adds the row to ``OPS``.

The graph op's kernel is the dispatch table (ckpt_ext.backend.kernel): the op never imports a backend; backends
(ckpt_ext/backends/*) read this table, e.g. the cpp backend gives each ``<name>_kernel`` op of ckpt_ext._C the row's
fake. The C++ kernel ops' schemas (csrc/ckpt_ext.cpp) equal the rows' ``schema`` (tests/test_op_schemas.py).
Autograd is registered beside each op, in the family's file (ops/*.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch._library.custom_ops import CustomOpDef

from .. import backend


@dataclass(frozen=True)
class OpSpec:
    name: str
    reference: Callable  # the math; its signature is the schema
    schema: str  # "(Tensor x, ...) -> (...)", without the op's name
    fake: Callable
    check: Optional[Callable]  # eager argument check before the kernel (the fake checks under tracing)
    flops: Optional[Callable]  # torch.utils.flop_counter formula, matmul ops only
    autocast_off: bool  # runs its own GEMMs: backends call the kernel with autocast off
    op: CustomOpDef


OPS: dict[str, OpSpec] = {}


def define(
    reference: Callable,
    *,
    fake: Callable,
    check: Optional[Callable] = None,
    flops: Optional[Callable] = None,
    autocast_off: bool = False,
) -> CustomOpDef:
    """Register ``ckpt_ext::<reference.__name__>`` with the schema of ``reference``'s signature, ``fake`` as its fake
    kernel and, as its kernel, the current backend's implementation for the device of the first argument."""
    name = reference.__name__
    schema = torch.library.infer_schema(reference, mutates_args=())

    def kernel(*args):
        if check is not None:
            check(*args)
        return backend.kernel(name, args[0].device.type)(*args)

    kernel.__name__ = kernel.__qualname__ = name
    op = torch.library.custom_op(f"ckpt_ext::{name}", kernel, mutates_args=(), schema=schema)
    op.register_fake(fake)
    OPS[name] = OpSpec(name, reference, schema, fake, check, flops, autocast_off, op)
    return op
