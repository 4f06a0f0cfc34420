"""Shared machinery of the Hugging Face adapters: class swapping, the fused-or-fallback decision, masks.

A converted layer keeps its identity: ``layer.__class__`` becomes a subclass ``Fused<Layer>`` of its own class (the
pattern FSDP2's ``fully_shard`` uses), so ``isinstance`` checks, submodules, parameters and ``state_dict()`` keys are
untouched. The subclass's ``forward`` asks the family adapter for the layer's parameter tensors (views and
concatenations of the original parameters, never copies held across calls) and runs ``ckpt_ext.block.fused_block``
when a training graph is being built; anything else (no_grad, generation with a filled KV cache, attention outputs,
head masks, cross-attention, hooks on the bypassed submodules) runs the original forward.

Masks: a 4-D mask broadcastable to (B, h, T, T) (bool keep-mask or additive float, as Hugging Face builds for eager and
SDPA) or a 2-D (B, T) padding mask becomes one additive float32 mask with ``finfo(float32).min`` at masked positions
(a finite value: rows that padding masks completely stay finite, as in Hugging Face's eager attention). A mask that
masks nothing beyond causality becomes None, so the fast unmasked kernels run. The conversion is cached on the mask
tensor object itself, so the layers of one forward share one (B, 1, T, T) buffer (not one per layer) and it is freed
with the model's mask.

Segment ids (``segment_ids_for``): for a causal layer whose 4-D mask is exactly causal ∧ key-keep ∧ same-segment (left
padding and/or packed sequences, as transformers 4.57 builds them), the mask becomes (B, T) int32 segment ids: keep is
the mask's diagonal, the segments come from ``position_ids`` (a new one wherever the position does not grow by 1, as
Hugging Face detects packing; arange when None), or, when that candidate does not match, keep alone (one segment per
row: 4.57 skips packing detection when a 2-D padding mask is given). The candidate's (B, 1, T, T) visibility must equal
the given mask on every row and a float mask must be 0 wherever it keeps a key (no bias), else None (the 4-D path). So
right padding, whose padded query rows Hugging Face lets see the real keys before them (ids give such rows none), keeps
the 4-D mask: exactness first. Cached on the mask tensor like the additive form (single entry, keyed by seq, the mask's
version and the position_ids tensor object and version), so 32 layers convert once.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor, nn

from .. import segments

logger = logging.getLogger("ckpt_ext.integrations")
_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message)


class FusedLayerMixin:
    """Placed first in the MRO of ``Fused<Layer>``; ``_ckpt_adapter`` is set on each generated class."""

    _ckpt_adapter = None

    @property
    def gradient_checkpointing(self) -> bool:
        """Always False: Hugging Face's checkpointing (GradientCheckpointingLayer) would wrap the fused block in
        torch.utils.checkpoint and recompute it twice. Setting it (gradient_checkpointing_enable) is ignored."""
        return False

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value) -> None:
        pass

    def forward(self, *args, **kwargs):
        original = super().forward  # the model's own forward (FusedLayerMixin is first in the MRO)
        return self._ckpt_adapter.forward(self, original, args, kwargs)


_FUSED_CLASSES: dict[type, type] = {}


def fused_class(cls: type, adapter) -> type:
    """The cached ``Fused<cls>`` subclass; registered in this module so that pickling by reference finds it."""
    if issubclass(cls, FusedLayerMixin):
        return cls
    if cls not in _FUSED_CLASSES:
        name = f"Fused{cls.__name__}"
        new = type(name, (FusedLayerMixin, cls), {"_ckpt_adapter": adapter, "__module__": __name__})
        new.__qualname__ = name
        globals()[name] = new
        _FUSED_CLASSES[cls] = new
    return _FUSED_CLASSES[cls]


def unfused_class(cls: type) -> Optional[type]:
    """The model's own class behind a generated Fused<Layer> class; None for any other class (e.g. FSDP's wrappers)."""
    return next((orig for orig, new in _FUSED_CLASSES.items() if new is cls), None)


def needs_graph(x: Tensor, params) -> bool:
    """True when autograd will record this call: the only case where checkpointing saves anything."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p is not None and p.requires_grad for p in params)


def is_intercepted(module: nn.Module) -> bool:
    """True when ``module`` has hooks or an instance-level forward (e.g. HF's output recorders): it must really run."""
    if module._forward_hooks or module._forward_pre_hooks:
        return True
    own = module.__dict__.get("forward")
    return own is not None and getattr(own, "__func__", None) is not type(module).forward


def any_intercepted(modules) -> bool:
    return any(is_intercepted(m) for m in modules if m is not None)


def additive_mask(mask: Optional[Tensor], seq: int, causal: bool) -> Optional[Tensor]:
    """HF attention mask -> additive float32 mask broadcastable to (B, 1, T, T), or None when it masks nothing.

    mask: None, (B, T_kv) padding mask (1 = keep), or 4-D (B|1, 1|h, T, T_kv) bool keep-mask / additive float.
    Columns beyond T are cut (HF may size the key axis for a cache). With ``causal`` the check for "masks nothing"
    ignores the positions causality masks anyway.
    """
    if mask is None:
        return None
    key = (seq, causal, mask._version)
    cached = getattr(mask, "_ckpt_additive", None)
    if cached is None or cached[0] != key:
        cached = (key, _build_additive(mask, seq, causal))
        mask._ckpt_additive = cached  # lives exactly as long as the model's mask tensor
    return cached[1]


def _build_additive(mask: Tensor, seq: int, causal: bool) -> Optional[Tensor]:
    with torch.no_grad():
        if mask.dim() == 2:
            keep = mask[:, None, None, :seq].bool()
        elif mask.dim() == 4:
            m = mask[..., :seq]
            keep = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        else:
            raise ValueError(f"unsupported attention mask of shape {tuple(mask.shape)}; expected (B, T) or 4-D")
        if mask.dim() == 4 and mask.dtype != torch.bool:
            additive = mask[..., :seq].float().clamp_min(torch.finfo(torch.float32).min)
        else:
            additive = torch.zeros(keep.shape, dtype=torch.float32, device=mask.device)
            additive.masked_fill_(~keep, torch.finfo(torch.float32).min)
        relevant = keep
        if causal:
            lower = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
            relevant = keep | ~lower
        if bool(relevant.all()) and (mask.dim() != 4 or mask.dtype == torch.bool or bool((additive[keep] == 0).all())):
            return None
        return additive


def segment_ids_for(mask: Optional[Tensor], position_ids: Optional[Tensor], seq: int) -> Optional[Tensor]:
    """(B, T) int32 segment ids equivalent to the causal layer's 4-D mask, or None (see the module docstring)."""
    if mask is None or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != seq or mask.shape[3] < seq:
        return None
    if torch.compiler.is_compiling():  # the exactness check reads the mask's values: under compile keep the 4-D mask
        return None
    if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[1] != seq):
        return None
    cached = getattr(mask, "_ckpt_segments", None)
    version = None if position_ids is None else position_ids._version
    if cached is None or cached[0] != (seq, mask._version, version) or cached[1] is not position_ids:
        cached = ((seq, mask._version, version), position_ids, _build_segments(mask, position_ids, seq))
        mask._ckpt_segments = cached
    return cached[2]


def _build_segments(mask: Tensor, position_ids: Optional[Tensor], seq: int) -> Optional[Tensor]:
    with torch.no_grad():
        m = mask[..., :seq]  # (B|1, 1, T, T)
        visible = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        if m.dtype != torch.bool and not bool((m[visible] == 0).all()):
            return None  # an additive bias is not a keep-mask
        b = visible.shape[0] if position_ids is None else max(visible.shape[0], position_ids.shape[0])
        keep = visible[:, 0].diagonal(dim1=-2, dim2=-1).expand(b, seq)  # (B, T): key t is seen by its own row
        if position_ids is None:
            position_ids = torch.arange(seq, device=mask.device)[None]
        if position_ids.device != mask.device:
            return None
        causal = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
        packed = segments.from_position_ids(position_ids.expand(b, seq), keep)  # (B, T) int32
        for ids in (packed, segments.from_keep_mask(keep)):  # packing, else padding alone (a 2-D mask turns
            if bool((segments.visibility(ids) & causal == visible).all()):  # 4.57's packing detection off)
                return ids
        return None
