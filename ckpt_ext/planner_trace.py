"""Live-bytes accounting of a training step, and one Hugging Face layer's memory and modeled time traced under fake
tensors: the planner's measurements of code it does not own (Hugging Face's eager layers and norms).

LiveBytes (a TorchDispatchMode): every storage an op creates (an output that is not a view of one of its inputs) is
followed with a weak reference from the op that created it to the first op after which it is gone. ``peak()`` sweeps
those spans: the largest sum of bytes alive at once, optionally leaving out chosen storages (parameter gradients are
model state, not activations). Storages created outside the mode (parameters, the step's inputs) are never counted.
Allocations inside one C++ kernel that never reach the dispatcher are not seen. The same mode measures a real CPU step
(tests/test_plan_hf.py) and a fake-tensor trace (below).

trace_layer(template, kind, seq, param_dtype, compute_dtype, rope_dim, batch, causal_mask) -> LayerTrace of one layer
(bytes kept after its forward beyond its input and output, and the most alive during its forward + backward), for kind
"eager" (the layer as written), "checkpoint" (torch.utils.checkpoint, non-reentrant) or a ckpt_ext policy (the layer
converted as apply_fused_checkpointing does). The layer is a fake-tensor copy of ``template`` (no data is copied) in
the parameter dtype, its forward run under CPU autocast when the compute dtype differs (backward outside autocast, as
a training loop does); SDPA is priced as the fused GPU kernel (ckpt_ext.roofline). Inputs made outside the trace, as
the model shares them across layers: x (B, T, d) in the parameter dtype, RoPE tables (1, T, head_dim), and the
(B, 1, T, T) bool causal mask transformers 4.57 hands its layers (converted layers are called without it: they turn an
exactly causal mask into none, which fake tensors cannot check). layer_seconds: the same step priced by
ckpt_ext.roofline (modeled H200 seconds). trace_module: bytes a small module (the final norm) keeps after forward.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LiveBytes(TorchDispatchMode):
    """Spans (bytes, first op, last op) of the storages ops create; ``peak()`` is the most alive at once."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.live: dict[int, tuple[StorageWeakRef, int, int]] = {}  # cdata -> (ref, nbytes, created at)
        self.spans: list[tuple[int, int, int, int]] = []  # (cdata, nbytes, start, end)
        self._dead: list[StorageWeakRef] = []  # held so a freed storage's cdata is never reused by a new one

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.step += 1
        self._prune()
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}  # fmt: skip
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in inputs and ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, storage.nbytes(), self.step)
        return out

    def _prune(self) -> None:
        for key in [k for k, (ref, _, _) in self.live.items() if ref.expired()]:
            ref, nbytes, start = self.live.pop(key)
            self._dead.append(ref)
            self.spans.append((key, nbytes, start, self.step))

    def alive(self, exclude=()) -> int:
        """Bytes of tracked storages alive now (``exclude``: tensors whose storages are left out)."""
        self._prune()
        skip = {StorageWeakRef(t.untyped_storage()).cdata for t in exclude}
        return sum(n for k, (_, n, _) in self.live.items() if k not in skip)

    def peak(self, exclude=()) -> int:
        """Most bytes alive at once so far, leaving out the storages of the tensors in ``exclude``."""
        self._prune()
        skip = {StorageWeakRef(t.untyped_storage()).cdata for t in exclude}
        spans = self.spans + [(k, n, s, self.step + 1) for k, (_, n, s) in self.live.items()]
        events = sorted(e for k, n, s, end in spans if k not in skip for e in ((s, n), (end, -n)))
        total = best = 0
        for i, (at, delta) in enumerate(events):  # frees at an op are applied before that op's allocations
            total += delta
            if i + 1 == len(events) or events[i + 1][0] != at:
                best = max(best, total)
        return best


@dataclass(frozen=True)
class LayerTrace:
    """One layer at batch 1: bytes kept after forward beyond its input, the most bytes alive during its forward +
    backward (kept bytes, recompute, upstream and input gradients; parameter gradients left out)."""

    retained: int
    peak: int


def fake_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are fresh tensors of the current (fake) mode; parameters in
    ``dtype`` (floating buffers too), requires_grad kept. The copy shares no tensor with ``module``."""
    out = _skeleton(module)
    for sub in out.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=p.requires_grad))
        for name, b in list(sub.named_buffers(recurse=False)):
            sub._buffers[name] = torch.empty(b.shape, dtype=dtype if b.is_floating_point() else b.dtype)
    return out


def _skeleton(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter and buffer replaced by a meta tensor of its shape (no data is
    copied), made with the fake mode paused so the copy holds no tensor of another mode."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        memo = {}
        for t in (*module.parameters(), *module.buffers()):
            meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        return copy.deepcopy(module, memo)


@contextlib.contextmanager
def _autocast(compute: torch.dtype, params: torch.dtype):
    with torch.autocast("cpu", dtype=compute, enabled=compute != params):
        yield


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _layer_fn(layer: nn.Module, kind: str, pe, mask):
    """x -> layer output under ``kind``, called as the model calls it: Hugging Face's own layer (eager or torch
    checkpoint) gets the (B, 1, T, T) bool causal mask the model builds; a converted layer turns an exactly causal
    mask into "no mask" (hf_common), so it is called without one (fake tensors carry no values to check)."""
    from torch.utils.checkpoint import checkpoint

    from . import roofline

    kw = {} if pe is None else {"position_embeddings": pe}
    if kind == "eager" or kind == "checkpoint":
        if mask is not None:
            kw["attention_mask"] = mask
        if kind == "eager":
            return lambda x: layer(x, **kw)
        return lambda x: checkpoint(layer, x, use_reentrant=False, **kw)
    return roofline.forward_fn(kind, layer, pe)


def _inputs(template, batch, seq, params, rope_dim, causal_mask):
    x = torch.empty(batch, seq, _width(template), dtype=params, requires_grad=True)  # (B, T, d)
    pe = None if rope_dim is None else tuple(torch.empty(1, seq, rope_dim, dtype=params) for _ in range(2))
    mask = torch.empty(batch, 1, seq, seq, dtype=torch.bool) if causal_mask else None  # (B, 1, T, T)
    return x, pe, mask


def _fake_step(template, kind, seq, batch, param_dtype, compute_dtype, rope_dim, causal_mask, mode, between):
    """One fake-tensor forward + backward of a ``kind`` layer shaped like ``template`` under the dispatch mode
    ``mode`` (SDPA priced as the fused kernel); ``between(out)`` runs after the forward. Returns (layer, out, what
    ``between`` returned)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import roofline

    params, compute = _DTYPES[param_dtype], _DTYPES[compute_dtype]
    with FakeTensorMode(allow_non_fake_inputs=False):
        layer = fake_copy(template, params).train()
        x, pe, mask = _inputs(template, batch, seq, params, rope_dim, causal_mask)
        fn = _layer_fn(layer, kind, pe, mask)
        with roofline._fused_sdpa_pricing(), mode:
            with _autocast(compute, params):
                out = _first_tensor(fn(x))  # (B, T, d)
            result = between(out)
            out.backward(torch.empty_like(out))
    return layer, out, result


@functools.lru_cache(maxsize=512)
def _trace_layer(template, kind, seq, param_dtype, compute_dtype, rope_dim, causal_mask, batch) -> LayerTrace:
    live = LiveBytes()
    layer, out, retained = _fake_step(template, kind, seq, batch, param_dtype, compute_dtype, rope_dim, causal_mask,
                                      live, lambda out: live.alive(exclude=(out,)))  # fmt: skip
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    return LayerTrace(retained, live.peak(exclude=(out, *grads)))


def _width(layer: nn.Module) -> int:
    """The layer's hidden size: its config's, else (layers that keep no config: BertLayer in 4.57) its first
    LayerNorm's width."""
    try:
        return _config_of(layer).hidden_size
    except ValueError:
        norm = next((m for m in layer.modules() if isinstance(m, nn.LayerNorm)), None)
        if norm is None:
            raise
        return norm.normalized_shape[-1]


def _config_of(layer: nn.Module):
    for m in layer.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None:
            return cfg
    raise ValueError(f"cannot find the config of {type(layer).__name__}")


def trace_layer(template: nn.Module, kind: str, seq: int, param_dtype: str, compute_dtype: str,
                rope_dim: Optional[int], batch: int = 1, causal_mask: bool = False) -> LayerTrace:  # fmt: skip
    """LayerTrace of one ``kind`` layer shaped like ``template`` at (batch, seq) (cached per template object)."""
    return _trace_layer(template, kind, seq, param_dtype, compute_dtype, rope_dim, causal_mask, batch)


@functools.lru_cache(maxsize=256)
def _trace_module(template, seq, d, param_dtype, compute_dtype, batch) -> int:
    """Bytes a small module (the final norm) keeps after forward beyond its input and output."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    params, compute = _DTYPES[param_dtype], _DTYPES[compute_dtype]
    with FakeTensorMode(allow_non_fake_inputs=False):
        module = fake_copy(template, params).train()
        x = torch.empty(batch, seq, d, dtype=params, requires_grad=True)
        live = LiveBytes()
        with live, _autocast(compute, params):
            out = _first_tensor(module(x))
            return live.alive(exclude=(out,))


def trace_module(template: nn.Module, seq: int, d: int, param_dtype: str, compute_dtype: str, batch: int = 1) -> int:
    return _trace_module(template, seq, d, param_dtype, compute_dtype, batch)


def layer_seconds(template: nn.Module, kind: str, seq: int, batch: int, param_dtype: str, compute_dtype: str,
                  rope_dim: Optional[int], causal_mask: bool = False) -> float:  # fmt: skip
    """Modeled H200 seconds (ckpt_ext.roofline prices) of one forward + backward of one ``kind`` layer."""
    return _layer_seconds(template, kind, seq, batch, param_dtype, compute_dtype, rope_dim, causal_mask)


@functools.lru_cache(maxsize=256)
def _layer_seconds(template, kind, seq, batch, param_dtype, compute_dtype, rope_dim, causal_mask) -> float:
    from . import roofline

    rec = roofline.CostRecorder()
    _fake_step(template, kind, seq, batch, param_dtype, compute_dtype, rope_dim, causal_mask, rec,
               lambda out: setattr(rec, "phase", "backward"))  # fmt: skip
    return sum(op.seconds for op in rec.ops)
