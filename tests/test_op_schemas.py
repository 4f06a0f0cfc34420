"""The C++ schemas against the op table: csrc/ckpt_ext.cpp is the one place ckpt_ext._C declares ops, and each kernel
op ``<name>_kernel`` there has exactly the schema of the graph op ``ckpt_ext::<name>`` (ckpt_ext/ops/table.py, inferred
from the reference function), so the cpp backend routes the graph op to it unchanged. Checked on the source (no build
needed) and on the loaded extension (a stale build fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import ckpt_ext  # noqa: F401  (registers the graph ops)
from ckpt_ext.backends.cpp import bridge
from ckpt_ext.ops.table import OPS

ROOT = Path(__file__).resolve().parent.parent
DECLARING_FILE = ROOT / "csrc" / "ckpt_ext.cpp"
# Helpers of the cpp backend's attention routes with no graph op (ckpt_ext/backends/aten_attention.py).
HELPER_KERNEL_OPS = {"attention_tile_dropout_kernel"}
OTHER_FRAGMENTS: set = set()  # files besides DECLARING_FILE allowed to declare ops: none


def _declared_schemas(text: str) -> dict[str, str]:
    """op name -> schema string of each m.def("...") in a C++ source (adjacent string literals joined)."""
    out = {}
    for call in re.finditer(r"m\.def\(\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+)", text):
        schema = "".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", call.group(1)))
        out[schema.split("(", 1)[0]] = schema
    return out


def _signature(schema: torch._C.FunctionSchema) -> list[tuple[str, str, str]]:
    """(name, type, default) of every argument, and the return types: what must agree between a kernel op and its
    graph op (the name differs by the _kernel suffix)."""
    args = [(a.name, str(a.type), repr(a.default_value) if a.has_default_value() else "") for a in schema.arguments]
    return args + [("->", str(r.type), "") for r in schema.returns]


def test_schemas_are_declared_in_one_file():
    stray = []
    for path in sorted((ROOT / "csrc").rglob("*")):
        rel = str(path.relative_to(ROOT))
        if path.is_file() and path != DECLARING_FILE and rel not in OTHER_FRAGMENTS:
            text = path.read_text(errors="replace")
            if "TORCH_LIBRARY(" in text or "TORCH_LIBRARY_FRAGMENT(" in text or _declared_schemas(text):
                stray.append(rel)
    assert not stray, f"op schemas declared outside {DECLARING_FILE.relative_to(ROOT)}: {stray}"


def test_every_kernel_schema_in_the_source_matches_the_table():
    declared = _declared_schemas(DECLARING_FILE.read_text())
    kernels = {name: schema for name, schema in declared.items() if name.endswith("_kernel")}
    assert len(kernels) >= 20, "the m.def parser found too few kernel ops"
    for name, schema in kernels.items():
        if name in HELPER_KERNEL_OPS:
            continue
        op = name.removesuffix("_kernel")
        assert op in OPS, f"{name} in csrc/ckpt_ext.cpp has no graph op {op} in the op table"
        parsed = torch._C.parse_schema(f"ckpt_ext::{schema}")
        expected = torch._C.parse_schema(f"ckpt_ext::{op}{OPS[op].schema}")
        assert _signature(parsed) == _signature(expected), f"{name}: {schema} != {op}{OPS[op].schema}"


def test_loaded_kernel_ops_match_the_graph_ops():
    """The built extension's kernel ops (a stale build would differ) against the registered graph ops."""
    assert bridge.KERNEL_OPS
    for kernel_op in bridge.KERNEL_OPS:
        op = kernel_op._schema.name.split("::")[1].removesuffix("_kernel")
        graph_schema = getattr(torch.ops.ckpt_ext, op).default._schema
        assert _signature(kernel_op._schema) == _signature(graph_schema), op


def test_the_signature_compare_sees_a_difference():
    a = torch._C.parse_schema("ckpt_ext::x(Tensor a, float eps) -> Tensor")
    b = torch._C.parse_schema("ckpt_ext::x(Tensor a, int eps) -> Tensor")
    c = torch._C.parse_schema("ckpt_ext::x(Tensor a, float eps) -> (Tensor, Tensor)")
    assert _signature(a) != _signature(b) and _signature(a) != _signature(c)


def test_table_schema_is_the_registered_schema():
    """Each row's schema (from its reference function) is what torch.library registered for the graph op."""
    for name, spec in OPS.items():
        registered = getattr(torch.ops.ckpt_ext, name).default._schema
        assert _signature(registered) == _signature(torch._C.parse_schema(f"ckpt_ext::{name}{spec.schema}")), name
