"""The fused block under torch.compile: forward and backward as two opaque custom ops, so the policy's save set binds.

Eager, the block is an autograd.Function (functional.FusedBlockFunction). torch.compile would trace through it and
AOTAutograd's partitioner would choose the saved set itself (re-saving, for ``block``, what the policy recomputes:
~5x the input instead of ~0.01x). Under torch.compile the block therefore runs as

    ckpt_ext::fused_block_fwd(x (B, T, d), mask?, cos?, sin?, params: Tensor[], seed (1,) int64, spec, segment_ids?)
        -> [out (B, T, d), *saved]      saved = exactly policies.POLICIES[policy].keeps minus x, in table order
    ckpt_ext::fused_block_bwd(dout (B, T, d), x, mask?, cos?, sin?, params, saved: Tensor[], seed, spec, segment_ids?,
                              needs: str = "")
        -> [dx (B, T, d), *grads]       one grad per parameter, in params order; where ``needs`` ("1"/"0" for x,
                                        then each parameter: requires_grad at forward; "": all) says "0", an
                                        empty tensor and no work (a frozen weight's dW GEMM is skipped)

(segment_ids: a required Tensor? argument, last: under dynamo a defaulted one is dropped from the call while
autograd still counts it) with fakes and autograd registered: the partitioner sees one op whose outputs are what
backward reads, so it saves them (and the graph inputs) and nothing else. ``params`` are the configuration's
parameters that exist (a Tensor?[] holding None trips torch's list-of-tensors autograd), in functional.param_names
order. ``spec`` is the BlockConfig
without its seed, which of param_names are present, and the forward's autocast state, as a string; both ops
re-enter that autocast state, so compiled and eager run the same casts. Inside, the ops run the same
functional.block_forward / block_backward as eager, so results are identical.

Dropout: ``seed`` is a tensor drawn inside the graph (seeds.py), read only inside these ops. With dropout the ops are
the ``_seeded`` variants, tagged ``cudagraph_unsafe`` (the seed is read on the host); without dropout the seed is never
read and the plain variants stay capturable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from . import seeds
from .functional import AutocastState, backward_from_saved, forward_saved
from .save_layout import save_layout
from .spec import ALL_PARAM_NAMES, BlockConfig, BlockSpec

_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(BlockSpec) if f.name != "lora")  # LoRA: eager only
_CALL_FIELDS = ("policy", "attn_dropout", "dropout")  # the BlockConfig fields besides spec and seed


def make_spec(cfg: BlockConfig, device_type: str, present: str = "") -> str:
    """The op's ``spec``: the BlockSpec's and cfg's fields (not the seed), ``present`` ("1" per param_names entry
    given, "0" per None) and the autocast state of ``device_type`` now."""
    enabled = torch.is_autocast_enabled(device_type) if device_type in ("cpu", "cuda") else False
    dtype = str(torch.get_autocast_dtype(device_type)).removeprefix("torch.") if enabled else "none"
    values = [repr(getattr(cfg.spec, f)) for f in _SPEC_FIELDS] + [repr(getattr(cfg, f)) for f in _CALL_FIELDS]
    return ";".join([*values, present, device_type, dtype])


def _value(text: str):
    if text.startswith("'"):
        return text.strip("'")
    if text in ("True", "False"):
        return text == "True"
    return float(text) if any(c in text for c in ".en") else int(text)


@functools.lru_cache(maxsize=256)
def _parse_spec(spec: str) -> tuple[BlockConfig, tuple[str, ...], str, Optional[torch.dtype]]:
    """(config with seed 0, names of the parameters the op receives, autocast device type, autocast dtype or None)."""
    *values, present, device_type, dtype = spec.split(";")
    kw = {name: _value(text) for name, text in zip(_SPEC_FIELDS + _CALL_FIELDS, values)}
    block = BlockSpec(**{f: kw.pop(f) for f in _SPEC_FIELDS})
    cfg = BlockConfig(block, seed=0, **kw)
    names = tuple(n for n, bit in zip(block.param_names(), present) if bit == "1")
    return cfg, names, device_type, None if dtype == "none" else getattr(torch, dtype)


def _autocast(device_type: str, dtype: Optional[torch.dtype]):
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def _params(names: tuple[str, ...], params) -> dict:
    p = dict.fromkeys(ALL_PARAM_NAMES)
    p.update(zip(names, params))
    return p


def _fresh(tensors: list[Tensor], inputs) -> list[Tensor]:
    """Outputs of a custom op may not alias its inputs or each other: copy any that share a storage."""
    seen = {StorageWeakRef(t.untyped_storage()) for t in inputs if isinstance(t, Tensor)}
    out = []
    for t in tensors:
        ptr = StorageWeakRef(t.untyped_storage())
        out.append(t.clone() if ptr in seen else t)
        seen.add(ptr)
    return out


def _forward(x, attn_mask, segment_ids, cos, sin, params, seed: int, spec: str) -> list[Tensor]:
    cfg, names, device_type, dtype = _parse_spec(spec)
    cfg = cfg.with_(seed=seed)
    b, t, d = x.shape
    rope_cs = None if cos is None else (cos, sin)
    with _autocast(device_type, dtype):
        out, flat, _ = forward_saved(x.reshape(b * t, d), (b, t), _params(names, params), cfg, attn_mask, rope_cs,
                                     segment_ids)  # fmt: skip
    return _fresh([out.view(b, t, d), *flat[1:]], [x, attn_mask, segment_ids, cos, sin, *params])


def _needed(names: tuple[str, ...], needs: str) -> Optional[frozenset]:
    """``needs``: "1"/"0" for x, then for each parameter the op receives ("": all): the names block_backward
    computes (None: all)."""
    return frozenset(n for n, bit in zip(("x", *names), needs) if bit == "1") if needs else None


def _backward(dout, x, attn_mask, segment_ids, cos, sin, params, saved, seed: int, spec: str,
              needs: str) -> list[Tensor]:  # fmt: skip
    """[dx, *grads]; a gradient ``needs`` does not ask for (a frozen weight: its dW is never computed) is an empty
    tensor (a list[Tensor] output cannot hold None); the autograd backward turns it into None."""
    cfg, names, device_type, dtype = _parse_spec(spec)
    cfg = cfg.with_(seed=seed)
    b, t, d = x.shape
    rope_cs = None if cos is None else (cos, sin)
    layout = (("x", 1), *save_layout(cfg.spec, cfg.policy, rope_cs is not None, cfg.ln2_from_out))
    ac = AutocastState(device_type)
    ac.enabled, ac.dtype = dtype is not None, dtype
    with ac():
        dx, g = backward_from_saved(dout.reshape(b * t, d), (x.reshape(b * t, d), *saved), layout,
                                    _params(names, params), cfg, (b, t), attn_mask, rope_cs, segment_ids, ac,
                                    _needed(names, needs))  # fmt: skip
    grads = [g[n].to(w.dtype).contiguous() if n in g else w.new_empty(0) for n, w in zip(names, params)]
    dx = x.new_empty(0) if dx is None else dx.view(b, t, d).to(x.dtype).contiguous()
    return [dx, *grads]


def _define(suffix: str, tags: tuple, read_seed) -> tuple:
    """Register fused_block_fwd{suffix} / fused_block_bwd{suffix}; ``read_seed(seed tensor) -> int``."""

    @torch.library.custom_op(f"ckpt_ext::fused_block_fwd{suffix}", mutates_args=(), tags=tags)
    def fwd(x: Tensor, attn_mask: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor],
            params: list[Tensor], seed: Tensor, spec: str, segment_ids: Optional[Tensor]) -> list[Tensor]:  # fmt: skip
        return _forward(x, attn_mask, segment_ids, cos, sin, params, read_seed(seed), spec)

    @fwd.register_fake
    def _(x, attn_mask, cos, sin, params, seed, spec, segment_ids):
        return _forward(x, attn_mask, segment_ids, cos, sin, params, 0, spec)

    @torch.library.custom_op(f"ckpt_ext::fused_block_bwd{suffix}", mutates_args=(), tags=tags)
    def bwd(dout: Tensor, x: Tensor, attn_mask: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor],
            params: list[Tensor], saved: list[Tensor], seed: Tensor, spec: str, segment_ids: Optional[Tensor],
            needs: str = "") -> list[Tensor]:  # fmt: skip
        return _backward(dout, x, attn_mask, segment_ids, cos, sin, params, saved, read_seed(seed), spec, needs)

    @bwd.register_fake
    def _(dout, x, attn_mask, cos, sin, params, saved, seed, spec, segment_ids, needs=""):
        bits = needs or "1" * (1 + len(params))
        return [t.new_empty(t.shape if bit == "1" else 0) for t, bit in zip([x, *params], bits)]

    def setup_context(ctx, inputs, output):
        x, attn_mask, cos, sin, params, seed, spec, segment_ids = inputs
        ctx.n_params, ctx.spec = len(params), spec
        ctx.needs = "".join("1" if t.requires_grad else "0" for t in (x, *params))  # frozen weights: no dW
        ctx.save_for_backward(x, attn_mask, segment_ids, cos, sin, seed, *params, *output[1:])

    def backward(ctx, grads):
        x, attn_mask, segment_ids, cos, sin, seed, *rest = ctx.saved_tensors
        params, saved = rest[: ctx.n_params], rest[ctx.n_params :]
        dout = grads[0] if grads[0] is not None else torch.zeros_like(x)
        out = bwd(dout.contiguous(), x, attn_mask, cos, sin, params, saved, seed, ctx.spec, segment_ids, ctx.needs)
        dx, *dparams = (t if bit == "1" else None for t, bit in zip(out, ctx.needs))
        return dx, None, None, None, dparams, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd, bwd


fused_block_fwd, fused_block_bwd = _define("", (), lambda seed: 0)
fused_block_fwd_seeded, fused_block_bwd_seeded = _define("_seeded", (torch.Tag.cudagraph_unsafe,), seeds.seed_value)


def compiled_block(x: Tensor, attn_mask, cos, sin, cfg: BlockConfig, params: tuple, segment_ids=None) -> Tensor:
    """The block as fused_block_fwd (autograd: fused_block_bwd); params in functional.param_names(cfg) order. Also
    used without grad when the seed is seeds.DEVICE_SEED (dropout drawn in the graph), with the smallest saved set."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in params))
    if not needs_grad:  # no autograd node: shrink the op's extra outputs (freed at once) to the statistics
        cfg = cfg.with_(policy="block")
    present = "".join("0" if t is None else "1" for t in params)
    params = [t for t in params if t is not None]
    spec = make_spec(cfg, x.device.type, present)
    if cfg.dropout > 0.0 or cfg.attn_dropout > 0.0:
        seed = seeds.seed_tensor(cfg.seed, x.device)
        return fused_block_fwd_seeded(x, attn_mask, cos, sin, params, seed, spec, segment_ids)[0]
    seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    return fused_block_fwd(x, attn_mask, cos, sin, params, seed, spec, segment_ids)[0]
