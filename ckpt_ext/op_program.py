"""An FX graph of dispatcher ops as a csrc/program.cpp program: encoded once, then run with one call from Python.

A graph traced by make_fx holds placeholders, calls of OpOverloads (aten ops, ckpt_ext kernel ops), getitems of their
results and one output. ``OpProgram(gm)`` numbers every tensor value with a slot, writes each call as an instruction
(operator, every schema argument in order: a slot, a constant, a Python number where the schema takes a Tensor (made
a wrapped-number tensor, as Python's argument parser does), or a list of slots; result slots; the slots whose last
use it is, to release) and registers the program with ``ckpt_ext::program_build``; ``program(*inputs)`` then runs all
instructions in C++ (``ckpt_ext::program_run``): the per-op Python of the generated code (an OpOverload call is ~2-4 µs
of Python argument handling) is gone, what is left per op is a boxed dispatcher call.
Raises ``Unsupported`` for a node or argument it cannot express (other Python calls, Tensor?[] arguments, ...): the
caller keeps the graph's Python code then.
"""

from __future__ import annotations

import importlib
import operator

import torch

# c10 enum values (ScalarType, MemoryFormat, Layout): a boxed call carries these as ints
_DTYPES = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4, torch.float16: 5,
           torch.float32: 6, torch.float64: 7, torch.bool: 11, torch.bfloat16: 15}  # fmt: skip
_MEMORY_FORMATS = {torch.contiguous_format: 0, torch.preserve_format: 1, torch.channels_last: 2,
                   torch.channels_last_3d: 3}  # fmt: skip
_LAYOUTS = {torch.strided: 0}
SLOT, INT, FLOAT, BOOL, NONE, INTS, SLOTS, STR, DEVICE, NUMBER_INT, NUMBER_FLOAT = range(11)  # csrc/program.cpp


class Unsupported(Exception):
    """The graph holds something a program cannot express."""


def available() -> bool:
    """Whether ckpt_ext._C is built with the program ops."""
    try:
        importlib.import_module("ckpt_ext._C")
    except ImportError:
        return False
    return hasattr(torch.ops.ckpt_ext, "program_run")


class _Encoder:
    def __init__(self):
        self.ops: list[str] = []
        self.op_index: dict[str, int] = {}
        self.floats: list[float] = []
        self.strs: list[str] = []
        self.n_slots = 0

    def new_slot(self) -> int:
        self.n_slots += 1
        return self.n_slots - 1

    def op(self, target) -> int:
        schema = target._schema
        name = schema.name + (f".{schema.overload_name}" if schema.overload_name else "")
        if name not in self.op_index:
            self.op_index[name] = len(self.ops)
            self.ops.append(name)
        return self.op_index[name]

    def string(self, s: str) -> int:
        self.strs.append(s)
        return len(self.strs) - 1

    def arg(self, value, type_name: str, slot_of: dict, reads: list) -> list[int]:
        base = type_name[len("Optional[") : -1] if type_name.startswith("Optional[") else type_name
        if isinstance(value, torch.fx.Node):
            if value not in slot_of:
                raise Unsupported(f"argument {value.name} is not a tensor value")
            reads.append(slot_of[value])
            return [SLOT, slot_of[value]]
        if value is None:
            return [NONE]
        if base == "Tensor":  # a Python number in a Tensor argument (x * 0.5 is aten::mul.Tensor(x, 0.5))
            if type(value) is int:
                return [NUMBER_INT, value]
            if type(value) is float:
                self.floats.append(value)
                return [NUMBER_FLOAT, len(self.floats) - 1]
            raise Unsupported(f"argument {value!r} of type {type_name}")
        if isinstance(value, bool):
            return [BOOL, int(value)]
        if isinstance(value, int) and base in ("float",):
            value = float(value)
        if isinstance(value, int):
            return [INT, value]
        if isinstance(value, float):
            self.floats.append(value)
            return [FLOAT, len(self.floats) - 1]
        if isinstance(value, str):
            return [STR, self.string(value)]
        if isinstance(value, torch.dtype) and value in _DTYPES:
            return [INT, _DTYPES[value]]
        if isinstance(value, torch.memory_format) and value in _MEMORY_FORMATS:
            return [INT, _MEMORY_FORMATS[value]]
        if isinstance(value, torch.layout) and value in _LAYOUTS:
            return [INT, _LAYOUTS[value]]
        if isinstance(value, torch.device):
            return [DEVICE, self.string(str(value))]
        if isinstance(value, (list, tuple)):
            if base == "List[Tensor]" and all(isinstance(v, torch.fx.Node) and v in slot_of for v in value):
                slots = [slot_of[v] for v in value]
                reads.extend(slots)
                return [SLOTS, len(slots), *slots]
            if base == "List[int]" and all(type(v) is int for v in value):
                return [INTS, len(value), *value]
        raise Unsupported(f"argument {value!r} of type {type_name}")


def _arguments(node: torch.fx.Node) -> list:
    """(value, schema type) of every schema argument of a call node, defaults filled in, in schema order."""
    out = []
    for i, a in enumerate(node.target._schema.arguments):
        if not a.kwarg_only and i < len(node.args):
            value = node.args[i]
        elif a.name in node.kwargs:
            value = node.kwargs[a.name]
        elif a.has_default_value():
            value = a.default_value
        else:
            raise Unsupported(f"{node.target}: no value for argument {a.name}")
        out.append((value, str(a.type)))
    return out


def encode(gm: torch.fx.GraphModule) -> tuple[list[str], list[int], list[float], list[str]]:
    """The (ops, code, floats, strs) of csrc/program.cpp's program_build for ``gm``."""
    enc = _Encoder()
    slot_of: dict = {}  # fx.Node -> slot of its tensor
    elements: dict = {}  # fx.Node with several results -> their slots
    instructions, outputs, n_inputs = [], None, 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            slot_of[node] = enc.new_slot()
            n_inputs += 1
        elif node.op == "call_function" and node.target is operator.getitem:
            source, index = node.args
            if source not in elements:
                raise Unsupported(f"getitem of {source.name}, which has one result")
            slot_of[node] = elements[source][index]
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            reads: list = []
            code = [enc.op(node.target)]
            args = _arguments(node)
            code.append(len(args))
            for value, type_name in args:
                code += enc.arg(value, type_name, slot_of, reads)
            returns = [str(r.type) for r in node.target._schema.returns]
            list_out = returns == ["List[Tensor]"]
            if list_out:
                val = node.meta.get("val")
                if not isinstance(val, (list, tuple)):
                    raise Unsupported(f"{node.target}: the trace did not record its list's length")
                outs = [enc.new_slot() for _ in val]
            elif all(r == "Tensor" for r in returns):
                outs = [enc.new_slot() for _ in returns]
            else:
                raise Unsupported(f"{node.target} returns {returns}")
            if len(outs) == 1 and not list_out:
                slot_of[node] = outs[0]
            else:
                elements[node] = outs
            instructions.append((code, outs, list_out, reads))
        elif node.op == "output":
            values = node.args[0] if isinstance(node.args[0], (list, tuple)) else (node.args[0],)
            if not all(isinstance(v, torch.fx.Node) and v in slot_of for v in values):
                raise Unsupported("an output that is not a tensor value")
            outputs = [slot_of[v] for v in values]
        else:
            raise Unsupported(f"node {node.name}: {node.op} {node.target}")
    if outputs is None:
        raise Unsupported("a graph without an output")
    last_use = {}
    for i, (_, outs, _, reads) in enumerate(instructions):
        for s in outs:
            last_use.setdefault(s, i)  # a result nobody reads is released at once
        for s in reads:
            last_use[s] = i
    keep = set(outputs)
    frees: list[list[int]] = [[] for _ in instructions]
    for s, i in last_use.items():
        if s not in keep:
            frees[i].append(s)
    code = [enc.n_slots, n_inputs, len(outputs), *outputs, len(instructions)]
    for (body, outs, list_out, _), freed in zip(instructions, frees):
        code += body + [len(outs), *outs, int(list_out), len(freed), *sorted(freed)]
    return enc.ops, code, enc.floats, enc.strs


class OpProgram:
    """``gm`` registered as a C++ program; call it with the graph's inputs to get its outputs (a list)."""

    def __init__(self, gm: torch.fx.GraphModule):
        ops, code, floats, strs = encode(gm)
        self.n_ops = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem)
        self.id = torch.ops.ckpt_ext.program_build.default(ops, code, floats, strs)
        self._run = torch.ops.ckpt_ext.program_run.default

    def __call__(self, *inputs):
        return self._run(self.id, list(inputs))

    def __del__(self):
        try:
            torch.ops.ckpt_ext.program_free.default(self.id)
        except Exception:  # noqa: BLE001  (interpreter shutdown: the registry goes with the process)
            pass
