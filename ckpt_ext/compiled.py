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
from .functional import (
    ALL_PARAM_NAMES,
    BlockConfig,
    _AutocastState,
    _unflatten_saved,
    attention_half,
    block_backward,
    block_forward,
    param_names,
)
from .policies import get_policy

_FIELDS = tuple(f.name for f in dataclasses.fields(BlockConfig) if f.name not in ("seed", "lora"))  # LoRA: eager only


def make_spec(cfg: BlockConfig, device_type: str, present: str = "") -> str:
    """The op's ``spec``: cfg's fields (not the seed), ``present`` ("1" per param_names entry given, "0" per None) and
    the autocast state of ``device_type`` now."""
    enabled = torch.is_autocast_enabled(device_type) if device_type in ("cpu", "cuda") else False
    dtype = str(torch.get_autocast_dtype(device_type)).removeprefix("torch.") if enabled else "none"
    values = [repr(getattr(cfg, f)) for f in _FIELDS]
    return ";".join([*values, present, device_type, dtype])


@functools.lru_cache(maxsize=256)
def _parse_spec(spec: str) -> tuple[BlockConfig, tuple[str, ...], str, Optional[torch.dtype]]:
    """(config with seed 0, names of the parameters the op receives, autocast device type, autocast dtype or None)."""
    *values, present, device_type, dtype = spec.split(";")
    kw = {}
    for name, text in zip(_FIELDS, values):
        kw[name] = text.strip("'") if text.startswith("'") else {"True": True, "False": False}.get(text, None)
        if kw[name] is None:
            kw[name] = float(text) if any(c in text for c in ".en") else int(text)
    cfg = BlockConfig(seed=0, **kw)
    names = tuple(n for n, bit in zip(param_names(cfg), present) if bit == "1")
    return cfg, names, device_type, None if dtype == "none" else getattr(torch, dtype)


def _autocast(device_type: str, dtype: Optional[torch.dtype]):
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def _saved_keys(cfg: BlockConfig) -> tuple[str, ...]:
    return tuple(k for k in get_policy(cfg.policy).keeps if k != "x")


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
    cfg = BlockConfig(**{**cfg.__dict__, "seed": seed})
    b, t, d = x.shape
    rope_cs = None if cos is None else (cos, sin)
    with _autocast(device_type, dtype):
        out, acts = block_forward(x.reshape(b * t, d), (b, t), _params(names, params), cfg, attn_mask, rope_cs,
                                  segment_ids)  # fmt: skip
    flat, layout = [], []
    for name in _saved_keys(cfg):
        if name in acts:
            v = acts[name] if isinstance(acts[name], tuple) else (acts[name],)
            flat.extend(v)
            layout.append((name, len(v)))
    if tuple(layout) != _layout(cfg, rope_cs is not None):
        raise RuntimeError(f"ckpt_ext: saved layout {layout} disagrees with compiled._layout for {spec!r}")
    return _fresh([out.view(b, t, d), *flat], [x, attn_mask, segment_ids, cos, sin, *params])


def _layout(cfg: BlockConfig, rope: bool) -> tuple[tuple[str, int], ...]:
    """(name, tensor count) of the saved list, as functional._flatten_saved lays it out (forward checks they agree)."""
    n_stats = 2 if cfg.norm == "layernorm" else 1
    qkv = 3 if cfg.qk_norm or rope or not cfg.packed_qkv else 1
    counts = {"ln1_stats": n_stats, "ln1_out": 1, "qkv": qkv, "qk_stats": 2 if cfg.qk_norm else 0,
              "qk_rope": 2 if cfg.qk_norm else 0, "attn_out": 1, "attn_lse": 1, "x1": 1, "ln2_stats": n_stats,
              "ln2_out": 1, "fc1_out": 2 if cfg.mlp == "swiglu" else 1, "act_out": 1}  # fmt: skip
    return tuple((k, counts[k]) for k in _saved_keys(cfg) if counts[k])


def _needed(names: tuple[str, ...], needs: str) -> Optional[frozenset]:
    """``needs``: "1"/"0" for x, then for each parameter the op receives ("": all): the names block_backward
    computes (None: all)."""
    return frozenset(n for n, bit in zip(("x", *names), needs) if bit == "1") if needs else None


def _backward(dout, x, attn_mask, segment_ids, cos, sin, params, saved, seed: int, spec: str,
              needs: str) -> list[Tensor]:  # fmt: skip
    """[dx, *grads]; a gradient ``needs`` does not ask for (a frozen weight: its dW is never computed) is an empty
    tensor (a list[Tensor] output cannot hold None); the autograd backward turns it into None."""
    cfg, names, device_type, dtype = _parse_spec(spec)
    cfg = BlockConfig(**{**cfg.__dict__, "seed": seed})
    b, t, d = x.shape
    p = _params(names, params)
    rope_cs = None if cos is None else (cos, sin)
    acts = _unflatten_saved(saved, _layout(cfg, rope_cs is not None))
    acts["x"] = x.reshape(b * t, d)
    ac = _AutocastState(device_type)
    ac.enabled, ac.dtype = dtype is not None, dtype
    with ac():
        if cfg.policy in ("block", "block_keep_attn"):
            kept = (acts["attn_out"], acts["attn_lse"]) if cfg.policy == "block_keep_attn" else None
            replay = attention_half(acts["x"], (b, t), p, cfg, attn_mask, rope_cs, kept, segment_ids)
            replay.pop("ln1_out")
            replay.pop("ln1_stats")
            acts.update(replay)
        dx, g = block_backward(dout.reshape(b * t, d), acts, p, cfg, (b, t), attn_mask, ac, rope_cs, segment_ids,
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
        cfg = BlockConfig(**{**cfg.__dict__, "policy": "block"})
    present = "".join("0" if t is None else "1" for t in params)
    params = [t for t in params if t is not None]
    spec = make_spec(cfg, x.device.type, present)
    if cfg.dropout > 0.0 or cfg.attn_dropout > 0.0:
        seed = seeds.seed_tensor(cfg.seed, x.device)
        return fused_block_fwd_seeded(x, attn_mask, cos, sin, params, seed, spec, segment_ids)[0]
    seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    return fused_block_fwd(x, attn_mask, cos, sin, params, seed, spec, segment_ids)[0]
