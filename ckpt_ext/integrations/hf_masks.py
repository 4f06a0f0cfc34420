"""Hugging Face attention masks as the fused block takes them, converted once per model forward.

``layer_mask(mask, seq, causal, layer, batch, position_ids) -> LayerMask`` for the mask a converted layer receives:
None, a (B, T_kv) padding mask (1 = keep), or a 4-D (B|1, 1|h, T, T_kv) bool keep-mask / additive float mask, as
transformers builds for eager and SDPA (columns beyond T are cut: HF may size the key axis for a cache).

- ``additive(mask)``: one additive float32 mask broadcastable to (B, 1, T, T) with ``finfo(float32).min`` at masked
  positions, or None when it masks nothing beyond causality (``causal``), so the unmasked kernels run.
- ``segment_ids(mask)``: for a causal layer whose 4-D mask is exactly causal ∧ key-keep ∧ same-segment (left or
  right padding and/or packed sequences, as transformers 4.57 builds them), (B, T) int32 segment ids: keep is the
  mask's diagonal, segments come from ``position_ids`` (a new one wherever the position does not grow by 1, as Hugging
  Face detects packing; arange when None), or, when that candidate does not match, keep alone (one segment per row:
  4.57 skips packing detection when a 2-D padding mask is given) with padded rows seeing nothing (ids 1 / 0: left
  padding) or, failing that, seeing the kept keys before them (ids 1 / -1, segments.from_key_mask: right padding, whose
  padded query rows Hugging Face lets attend). A mask of batch 1 and ids of batch 1 are expanded to the input's batch.
  The candidate's (B, 1, T, T) visibility must equal the given mask on every row and a float mask must be 0 wherever
  it keeps a key (no bias), else None (the 4-D path): exactness first.
- ``key_ids(mask)``: for a bidirectional layer (the encoders), the key-padding mask as (B, T) int32 key ids
  (segments.from_key_mask: 1 kept, -1 padded: the kernels hide the padded keys, padded query rows still attend to the
  kept ones, as Hugging Face computes them, and key tiles of only padding are skipped), with the checks that make
  them exact (``KEY_MASK_CHECKS``): every query row of a 4-D mask equal to its first, a float mask 0 wherever it keeps
  a key (no bias), and every batch row keeping some key (Hugging Face's finfo.min softmax gives a row of only padding
  uniform weights; the kernels give zeros). Returns ``KeyIds(ids, failed)``: ids None when nothing is masked; failed
  the first check that does not hold (eager: the layer runs its original forward). Under torch.compile the mask
  cannot be read, so the ids are always built and each check becomes a device assertion (torch._assert_async: an
  error instead of a wrong number, and no graph break). On CPU that is a RuntimeError carrying the message; on CUDA a
  device-side assert ("device-side assert triggered"), after which the process's CUDA context is unusable and the job
  must restart. The only case Hugging Face's own masks can trigger is a batch row with no real token: drop empty
  examples, or run such batches uncompiled (the eager path runs the original forward for them).
- ``memo(key, build)``: a layer-family check derived from the mask (ModernBERT's window band, its rows without a key
  in their window), computed once per forward per key.
- ``empty_rows(mask)``: True when some query row sees no key at all (left padding). The fused kernels give such rows
  zeros, as SDPA does; eager attention gives them a uniform softmax (its mask is finfo.min, not -inf), so an eager
  layer must run its original forward for such a mask.

Caching: every conversion reads the mask's values (and syncs a GPU once), so it is done once per model forward and
shared by the layers: the LayerMask lives on the mask tensor object (``mask._ckpt_mask``, freed with the mask) together
with the set of layers that used it. A layer meeting an entry it has already used starts a new forward, which
rebuilds it; so does another seq/causal/batch or another ``position_ids`` object. Nothing is keyed on version counters:
a mask changed in place between forwards through ``.data`` or a NumPy view (no version bump), or inference tensors
(no version counter at all), cannot give stale ids. A mask changed in place between the layers of one forward is not
noticed (no model does that). Under torch.compile nothing is cached or read by value: ``additive`` always returns the
float mask, ``segment_ids`` None, ``empty_rows`` None (unknown), so the traced region has no data-dependent branch.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import segments

_UNSET = object()

# check name -> what the mask is when the check fails (the fallback warning and the compiled assertion's message)
KEY_MASK_CHECKS = {
    "mask-rows": "a 4-D attention mask that is not a key-padding mask (its query rows differ)",
    "mask-bias": "an additive attention mask with values other than 0 and its minimum (a bias, not padding)",
    "mask-empty": "a padding mask that leaves a batch row no key (Hugging Face's softmax gives it uniform weights, "
    "the fused kernels zeros)",
}


class KeyIds(NamedTuple):
    """An encoder mask as key ids (see ``LayerMask.key_ids``): ids (B, T) int32 or None, failed a KEY_MASK_CHECKS
    name or None."""

    ids: Optional[Tensor]
    failed: Optional[str]


def holds(ok: Tensor, message: str) -> bool:
    """A 0-dim bool check on mask values: under torch.compile a device assertion (fails at run time with ``message``:
    a RuntimeError on CPU, a device-side assert on CUDA; returns True), else its value."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, f"ckpt_ext: the fused layer met {message}; run it without torch.compile")
        return True
    return bool(ok)


class LayerMask:
    """The conversions of one Hugging Face mask for one model forward (see the module docstring)."""

    def __init__(self, seq: int, causal: bool, batch: int, position_ids: Optional[Tensor], cached: bool):
        self.seq, self.causal, self.batch, self.position_ids, self.cached = seq, causal, batch, position_ids, cached
        self.users: set[int] = set()  # id() of the layers that took this entry in the current forward
        self._additive = self._segments = self._empty = self._key_ids = _UNSET
        self._memo: dict = {}

    def matches(self, seq: int, causal: bool, batch: int, position_ids: Optional[Tensor]) -> bool:
        return (self.seq, self.causal, self.batch) == (seq, causal, batch) and self.position_ids is position_ids

    def additive(self, mask: Tensor) -> Optional[Tensor]:
        if self._additive is _UNSET:
            self._additive = _build_additive(mask, self.seq, self.causal, check=self.cached)
        return self._additive

    def segment_ids(self, mask: Tensor) -> Optional[Tensor]:
        if self._segments is _UNSET:
            ok = self.cached and self.causal and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == self.seq
            pos = self.position_ids
            ok = ok and (pos is None or (pos.dim() == 2 and pos.shape[1] == self.seq and pos.device == mask.device))
            self._segments = _build_segments(mask, pos, self.seq, self.batch) if ok else None
        return self._segments

    def key_ids(self, mask: Tensor) -> KeyIds:
        if self._key_ids is _UNSET:
            self._key_ids = _build_key_ids(mask, self.seq, self.batch, self.cached)
        return self._key_ids

    def memo(self, key, build):
        """``build()`` once per forward for ``key`` (everything else the result depends on must be in ``key`` or fixed
        within the forward); every call under torch.compile, where nothing is cached."""
        if not self.cached:
            return build()
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def empty_rows(self, mask: Tensor) -> Optional[bool]:
        if self._empty is _UNSET:
            self._empty = _has_empty_rows(mask, self.seq, self.causal) if self.cached else None
        return self._empty


def layer_mask(mask: Tensor, seq: int, causal: bool, layer, batch: int, position_ids: Optional[Tensor] = None):
    """The LayerMask of ``mask`` for this forward of ``layer`` (built, or shared with the forward's earlier layers)."""
    if mask.dim() not in (2, 4):
        raise ValueError(f"unsupported attention mask of shape {tuple(mask.shape)}; expected (B, T) or 4-D")
    if torch.compiler.is_compiling():
        return LayerMask(seq, causal, batch, position_ids, cached=False)
    entry = getattr(mask, "_ckpt_mask", None)
    if entry is None or id(layer) in entry.users or not entry.matches(seq, causal, batch, position_ids):
        entry = LayerMask(seq, causal, batch, position_ids, cached=True)
        mask._ckpt_mask = entry  # lives exactly as long as the model's mask tensor (no reference back to it)
    entry.users.add(id(layer))
    return entry


def visible(mask: Tensor) -> Tensor:
    """Bool, same shape: where a bool keep-mask is True or an additive mask is above finfo(dtype).min / 2 (Hugging
    Face masks with finfo.min, sometimes summed twice)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _keep(mask: Tensor, seq: int) -> Tensor:
    """Bool keep-mask broadcastable to (B, 1|h, T, T) (a 2-D mask as (B, 1, 1, T))."""
    if mask.dim() == 2:
        return mask[:, None, None, :seq].bool()
    return visible(mask[..., :seq])


def _build_additive(mask: Tensor, seq: int, causal: bool, check: bool) -> Optional[Tensor]:
    with torch.no_grad():
        keep = _keep(mask, seq)
        if mask.dim() == 4 and mask.dtype != torch.bool:
            additive = mask[..., :seq].float().clamp_min(torch.finfo(torch.float32).min)
        else:
            additive = torch.zeros(keep.shape, dtype=torch.float32, device=mask.device)
            additive.masked_fill_(~keep, torch.finfo(torch.float32).min)
        if not check:
            return additive
        relevant = keep
        if causal:
            lower = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
            relevant = keep | ~lower
        if bool(relevant.all()) and (mask.dim() != 4 or mask.dtype == torch.bool or bool((additive[keep] == 0).all())):
            return None
        return additive


def _build_key_ids(mask: Tensor, seq: int, batch: int, cached: bool) -> KeyIds:
    with torch.no_grad():
        m = mask[:, None, None, :seq] != 0 if mask.dim() == 2 else mask[..., :seq]  # (B|1, 1|h, T|1, T)
        first = m[:, :, :1]  # (B|1, 1|h, 1, T): the keys the first query row keeps
        keep = _keep(first, seq)
        checks = {"mask-empty": keep.any(dim=-1).all()}
        if m.dim() == 4 and (m.shape[1] != 1 or (m.shape[2] != 1 and m.stride(2) != 0)):
            checks["mask-rows"] = (m == first[:, :1]).all()  # every head and query row as the first
        if m.dtype != torch.bool and mask.dim() == 4:
            checks["mask-bias"] = (first.masked_fill(~keep, 0) == 0).all()
        for name in ("mask-rows", "mask-bias", "mask-empty"):
            if name in checks and not holds(checks[name], KEY_MASK_CHECKS[name]):
                return KeyIds(None, name)
        if cached and bool(keep.all()):
            return KeyIds(None, None)
        ids = torch.where(keep[:, 0, 0], 1, -1).to(torch.int32)  # (B|1, T): segments.from_key_mask's 1 / -1
        return KeyIds(ids.expand(batch, seq).contiguous(), None)


def _has_empty_rows(mask: Tensor, seq: int, causal: bool) -> bool:
    with torch.no_grad():
        keep = _keep(mask, seq)
        if causal:
            keep = keep & torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
        return bool((~keep.any(dim=-1)).any())


def _build_segments(mask: Tensor, position_ids: Optional[Tensor], seq: int, batch: int) -> Optional[Tensor]:
    with torch.no_grad():
        m = mask[..., :seq]  # (B|1, 1, T, T)
        seen = visible(m)
        if m.dtype != torch.bool and not bool((m[seen] == 0).all()):
            return None  # an additive bias is not a keep-mask
        keep = seen[:, 0].diagonal(dim1=-2, dim2=-1).expand(batch, seq)  # (B, T): key t is seen by its own row
        if position_ids is None:
            position_ids = torch.arange(seq, device=mask.device)[None]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
        packed = segments.from_position_ids(position_ids.expand(batch, seq), keep)  # (B, T) int32
        # packing, else padding alone (a 2-D mask turns 4.57's packing detection off): padded rows seeing nothing
        # (left padding), else seeing the kept keys before them (right padding, as Hugging Face builds it)
        for ids in (packed, segments.from_keep_mask(keep), segments.from_key_mask(keep)):
            if bool((segments.visibility(ids) & causal == seen).all()):
                return ids
        return None
