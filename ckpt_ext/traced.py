"""Traced programs of the block's eager fast path: trace once per configuration, then run straight-line code.

At small shapes a block step's time is mostly the host's (bench/host.py): even on the fast path
(functional.EagerFastPath: kernels called directly, below autograd) every call walks the block's helpers, dicts and
policy branches again, although all they decide is fixed by the configuration. So for one key
    (backend; every argument of the call: BlockConfig, parameter names, and each tensor's shape, strides, dtype,
     device, layout and requires_grad: x (B, T, d) as given, so its (B, T) split too, every parameter, cos, sin)
the forward (functional.forward_saved: block_forward and the policy's save set) and, per dout layout, the backward
(functional.backward_from_saved: the block policies' attention-half recompute and block_backward) are traced once with
make_fx through the kernels the fast path calls: a graph of aten ops and ckpt_ext C++ kernel ops (``*_kernel``), dead
nodes removed (e.g. an lse copy the policy does not keep), registered as a C++ program (op_program.py,
csrc/program.cpp). Later calls run it with one call from Python: each op a boxed dispatcher call, temporaries
released at their last use. Same kernels, same arguments, same order: outputs and gradients are
bitwise those of the walked fast path (tests/test_traced.py), and the saved set is the same tensors.

Eligible when nothing a graph would freeze can change between calls with the same key:
- no dropout (a call's seed would be a traced constant) and no attn_mask or segment_ids (the masked attention routes
  read mask values on the host);
- autocast off (its casts depend on state outside the key);
- a backend whose kernels are ops make_fx records: cpp and cuda (Triton launches are not ops; reference runs
  Python math that could read values);
- a trace that reads no tensor value on the host (a graph holding ``_local_scalar_dense`` is refused).
Anything else, or a trace that fails (warned once), runs the walked fast path. ``CKPT_EXT_TRACED=0`` or
``set_enabled(False)`` turns tracing off. A key is traced on its TRACE_AFTER-th call (a shape seen once, e.g. a last
short batch, never pays for a trace: tens of ms) and kept with its backward programs among the MAX_PROGRAMS most
recently traced keys; a backward program is traced on the first backward of its dout layout. Layers of one model
with one configuration share their programs.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from . import backend, op_program

MAX_PROGRAMS = 64  # forward programs kept (the first traced is dropped first)
TRACE_AFTER = 2  # a key is traced on its second call
MAX_SEEN = 4096  # keys counted while not yet traced
TRACEABLE_BACKENDS = ("cpp", "cuda")
_UNSEEN = object()

_state = {"enabled": os.environ.get("CKPT_EXT_TRACED", "1") != "0"}
_programs: OrderedDict = OrderedDict()  # forward key -> ForwardProgram, or None where tracing was refused
_seen: OrderedDict = OrderedDict()  # forward key -> calls so far, until it is traced
_lock = threading.Lock()
_warned: set = set()


def set_enabled(flag: bool) -> None:
    """Turn traced programs on or off for the process (off: every call walks the fast path)."""
    _state["enabled"] = bool(flag)


def is_enabled() -> bool:
    return _state["enabled"]


def clear() -> None:
    """Drop every cached program."""
    with _lock:
        _programs.clear()
        _seen.clear()


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eligible(cfg, attn_mask: Optional[Tensor], segment_ids: Optional[Tensor], x: Tensor, params, cos, sin) -> bool:
    """Whether this call may run a traced program (module docstring). Tensor subclasses (DTensor, ...) walk: their
    __torch_dispatch__ must see the block's ops, not one opaque program_run."""
    if not _state["enabled"] or attn_mask is not None or segment_ids is not None:
        return False
    if cfg.dropout > 0.0 or cfg.attn_dropout > 0.0 or any(spec.dropout > 0.0 for spec in cfg.spec.lora):
        return False
    if type(x) not in _PLAIN or type(cos) not in (*_PLAIN, type(None)) or type(sin) not in (*_PLAIN, type(None)):
        return False
    if not all(t is None or type(t) in _PLAIN for t in params):
        return False
    device_type = x.device.type
    if device_type == "cpu" or device_type == "cuda":
        if torch.is_autocast_enabled(device_type):
            return False
    else:
        return False
    return backend.concrete_backend(device_type) in TRACEABLE_BACKENDS


def _meta(t: Optional[Tensor]):
    """Everything about a tensor that a trace may bake in, values excepted."""
    if t is None:
        return None
    return (tuple(t.shape), t.stride(), t.dtype, t.device, t.layout, t.requires_grad, t.is_conj(), t.is_neg())


def key_of(*parts) -> tuple:
    """A cache key from a call's arguments: every tensor by _meta, everything else (config, names) as it is."""
    return tuple(_meta(a) if isinstance(a, Tensor) else a for a in parts)


def _present(params) -> tuple[int, ...]:
    return tuple(i for i, t in enumerate(params) if t is not None)


def _check_graph(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("the trace reads a tensor value on the host (_local_scalar_dense)")


def _trace(fn, inputs):
    """fn's graph on these inputs, as a callable: a C++ OpProgram, or the graph's Python code where the program
    cannot express it (or the extension lacks the program ops)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn)(*inputs)
    _check_graph(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    if op_program.available():
        try:
            program = op_program.OpProgram(gm)
            _verify(program, gm, inputs)
            return program
        except (op_program.Unsupported, RuntimeError) as err:
            _refuse(None, err, "runs its traced graph's Python code")
    return gm


def _verify(program, gm, inputs) -> None:
    """Run the C++ program once on the trace's inputs: it must give the graph's outputs bit for bit (same dtypes,
    shapes, strides), or the caller keeps the graph's Python code."""
    for i, (got, want) in enumerate(zip(program(*inputs), gm(*inputs), strict=True)):
        same_layout = got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
        if not same_layout or not torch.equal(got.nan_to_num(), want.nan_to_num()):
            raise RuntimeError(f"the C++ program's output {i} differs from the traced graph's")


def _refuse(key, err: Exception, what: str = "runs untraced") -> None:
    text = f"{type(err).__name__}: {err}"
    if text not in _warned:
        _warned.add(text)
        warnings.warn(f"ckpt_ext.traced: this block configuration {what} ({text})", stacklevel=3)


class ForwardProgram:
    """The traced forward of one key, its save-set layout, and its backward programs by dout layout."""

    def __init__(self, run, layout, cfg, shape, names, present, has_rope: bool, device_type, backend_name):
        self.run, self.layout = run, layout
        self.backend_name = backend_name  # the concrete backend it was traced under
        self.cfg, self.shape, self.names, self.present = cfg, shape, names, present
        self.has_rope, self.device_type = has_rope, device_type
        self.backward_programs: dict = {}

    def _inputs(self, params, cos, sin) -> list:
        inputs = [params[i] for i in self.present]
        if self.has_rope:
            inputs += [cos, sin]
        return inputs

    def run_forward(self, x2: Tensor, params, cos, sin) -> tuple[Tensor, list]:
        out, *flat = self.run(x2, *self._inputs(params, cos, sin))
        return out, flat

    def backward_program(self, dout2: Tensor, params, cos, sin, flat, needs: frozenset) -> Optional[BackwardProgram]:
        """Keyed by the layout of dout and of the saved tensors as unpacked (saved_tensors_hooks may hand back
        copies with other strides, e.g. torch.autograd.graph.save_on_cpu) and by the gradients needed (``needs``:
        functional.needed_grads; frozen weights are not computed)."""
        if backend.concrete_backend(self.device_type) != self.backend_name:
            return None
        key = key_of(tuple(sorted(needs)), dout2, cos, sin, *params, *flat)
        if key in self.backward_programs:
            return self.backward_programs[key]
        program = None
        try:
            program = BackwardProgram(self, dout2, params, cos, sin, flat, needs)
        except Exception as err:  # noqa: BLE001  (any trace failure: run the walked fast path)
            _refuse(key, err)
        self.backward_programs[key] = program
        return program


class BackwardProgram:
    """The traced backward of a ForwardProgram for one dout layout and one set of needed gradients: -> dx (if "x" is
    needed), the needed parameter grads in ``names`` order."""

    def __init__(self, fwd: ForwardProgram, dout2, params, cos, sin, flat, needs: frozenset):
        from . import functional

        self.fwd = fwd
        n_present, n_flat = len(fwd.present), len(flat)
        names, present, cfg, shape = fwd.names, fwd.present, fwd.cfg, fwd.shape
        self.with_dx = "x" in needs
        self.computed = tuple(i for i in present if names[i] in needs)  # indices into names of the grads returned

        def backward(dout, *rest):
            p = dict.fromkeys(functional.ALL_PARAM_NAMES)
            p.update((names[i], t) for i, t in zip(present, rest[:n_present]))
            rope_cs = tuple(rest[n_present : n_present + 2]) if fwd.has_rope else None
            saved = rest[len(rest) - n_flat :]
            ac = functional.AutocastState(dout.device.type)
            with functional.kernels_direct(fwd.device_type):
                dx, g = functional.backward_from_saved(dout, saved, fwd.layout, p, cfg, shape, None, rope_cs, None, ac,
                                                       needs)  # fmt: skip
            return (*((dx,) if self.with_dx else ()), *(g[names[i]] for i in self.computed))

        inputs = [dout2, *fwd._inputs(params, cos, sin), *flat]
        self.run = _trace(backward, [t.detach() for t in inputs])

    def run_backward(self, dout2: Tensor, params, cos, sin, flat) -> tuple[Optional[Tensor], tuple]:
        out = list(self.run(dout2, *self.fwd._inputs(params, cos, sin), *flat))
        dx = out.pop(0) if self.with_dx else None
        grads = [None] * len(self.fwd.names)
        for i, g in zip(self.computed, out):
            grads[i] = g
        return dx, tuple(grads)


def forward_program(x: Tensor, attn_mask, segment_ids, cos, sin, cfg, names, params) -> Optional[ForwardProgram]:
    """The traced forward for this call's key, or None: while the key is new (the first TRACE_AFTER - 1 calls of a
    key walk the fast path, so one-off shapes are never traced) or where tracing was refused.

    The key is every argument of the call (x (B, T, d) itself, not its (B·T, d) view: the trace bakes (B, T) in),
    tensors by _meta, and the concrete backend."""
    key = key_of(backend.concrete_backend(x.device.type), cfg, names, x, attn_mask, segment_ids, cos, sin, *params)
    program = _programs.get(key, _UNSEEN)
    if program is not _UNSEEN:
        return program
    with _lock:
        seen = _seen[key] = _seen.get(key, 0) + 1
        if len(_seen) > MAX_SEEN:
            _seen.popitem(last=False)
    if seen < TRACE_AFTER:
        return None
    program = None
    b, t, d = x.shape
    try:
        program = _trace_forward(x.reshape(b * t, d), (b, t), cfg, names, params, cos, sin)
    except Exception as err:  # noqa: BLE001  (any trace failure: run the walked fast path)
        _refuse(key, err)
    with _lock:
        _seen.pop(key, None)
        _programs[key] = program
        while len(_programs) > MAX_PROGRAMS:
            _programs.popitem(last=False)
    return program


def _trace_forward(x2, shape, cfg, names, params, cos, sin) -> ForwardProgram:
    from . import functional

    present = _present(params)
    has_rope = cos is not None
    device_type = x2.device.type
    layout_box = []

    def forward(x, *rest):
        p = dict.fromkeys(functional.ALL_PARAM_NAMES)
        p.update((names[i], t) for i, t in zip(present, rest))
        rope_cs = tuple(rest[len(present) :]) if has_rope else None
        with functional.kernels_direct(device_type):
            out, flat, layout = functional.forward_saved(x, shape, p, cfg, None, rope_cs, None)
        layout_box.append(layout)
        return (out, *flat)

    inputs = [x2] + [params[i] for i in present] + ([cos, sin] if has_rope else [])
    run = _trace(forward, [t.detach() for t in inputs])
    return ForwardProgram(
        run, layout_box[0], cfg, shape, names, present, has_rope, device_type, backend.concrete_backend(device_type)
    )
