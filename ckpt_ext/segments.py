"""Segment ids: key padding and packed sequences as one compact (B, S) attention argument.

``segment_ids`` (B, S) int32 (int64 accepted): query row i of batch b sees key j iff seg[b, j] != 0 and
seg[b, i] == seg[b, j] (and j <= i when causal; the attention ops need T == S). 0 marks padding: a padded query row
sees no key (zeros out, lse = -inf, zero gradients) and a padded key is seen by no row. Converters (all return fresh
int32 tensors on the input's device and raise ValueError/TypeError naming the argument on bad input):

- ``from_lengths(lengths (B,), seq_len) -> (B, seq_len)``: right padding, 1 for j < lengths[b], else 0.
- ``from_keep_mask(keep (B, T)) -> (B, T)``: bool or 0/1 keep mask (Hugging Face's 2-D attention_mask): 1 / 0.
- ``from_cu_seqlens(cu_seqlens (n+1,), total) -> (1, total)``: a flattened varlen batch (FlashAttention's
  cu_seqlens: 0 = c_0 <= c_1 <= ... <= c_n <= total): ids 1..n, positions c_n..total-1 are padding (0).
- ``from_position_ids(position_ids (B, T), keep=None) -> (B, T)``: a new segment wherever the position does not grow
  by exactly 1 from the previous token (how Hugging Face detects packed sequences), ids 1, 2, ... per batch row;
  tokens where ``keep`` is 0/False become padding (0).
- ``visibility(segment_ids (B, S)) -> (B, 1, S, S)`` bool: the equivalent keep mask (causality not included);
  ``with_mask(attn_mask, segment_ids)``: both as one mask of attn_mask's kind (bool and'ed, -inf over a float one).
- ``key_ranges(segment_ids (B, S)) -> (start, end)`` (B, S) int32 each: for every row the first and last key it may
  see, for kernels that skip key tiles: the row's run of equal ids when every nonzero id of that batch row occupies
  one contiguous run (checked on the device: each nonzero run's id exceeds every earlier nonzero id), else 0 and
  S - 1. Both are non-decreasing along S, so a tile of rows r0..r1 sees keys start[r0]..end[r1] at most; as T == S
  the same ranges bound the query rows that see a tile of keys.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_int(x: Tensor, name: str, fn: str, dims: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor; got {type(x).__name__}")
    if x.dtype not in _INT_DTYPES:
        raise TypeError(f"{fn}: {name} must be an integer tensor (int32 or int64); got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{fn}: {name} must have {dims} dimension(s); got shape {tuple(x.shape)}")


def from_lengths(lengths: Tensor, seq_len: int) -> Tensor:
    """(B, seq_len) int32: 1 for positions j < lengths[b], 0 (padding) after."""
    _check_int(lengths, "lengths", "from_lengths", 1)
    if not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"from_lengths: seq_len must be a non-negative int; got {seq_len!r}")
    if lengths.numel() and (bool((lengths < 0).any()) or bool((lengths > seq_len).any())):
        raise ValueError(f"from_lengths: lengths must lie in [0, seq_len={seq_len}]; got {lengths.tolist()}")
    pos = torch.arange(seq_len, device=lengths.device)  # (S,)
    return (pos[None, :] < lengths[:, None]).to(torch.int32)


def from_keep_mask(keep: Tensor) -> Tensor:
    """(B, T) int32 from a bool or 0/1 keep mask: 1 where kept, 0 where padded."""
    if not isinstance(keep, Tensor):
        raise TypeError(f"from_keep_mask: keep must be a tensor; got {type(keep).__name__}")
    if keep.dim() != 2:
        raise ValueError(f"from_keep_mask: keep must be (B, T); got shape {tuple(keep.shape)}")
    if keep.dtype != torch.bool:
        if keep.dtype.is_complex:
            raise TypeError(f"from_keep_mask: keep must be bool or 0/1 numbers; got {keep.dtype}")
        if keep.numel() and not bool(((keep == 0) | (keep == 1)).all()):
            raise ValueError("from_keep_mask: keep must hold only 0 and 1 (or be bool)")
    return (keep != 0).to(torch.int32)


def from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """(1, total) int32 ids 1..n for the n sequences cu_seqlens[i]:cu_seqlens[i+1] of a flattened batch, 0 after
    cu_seqlens[-1]."""
    _check_int(cu_seqlens, "cu_seqlens", "from_cu_seqlens", 1)
    if not isinstance(total, int) or total < 0:
        raise ValueError(f"from_cu_seqlens: total must be a non-negative int; got {total!r}")
    cu = cu_seqlens.to(torch.int64)
    if cu.numel() == 0 or int(cu[0]) != 0:
        raise ValueError("from_cu_seqlens: cu_seqlens must start with 0 (n + 1 offsets for n sequences)")
    if bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) > total:
        raise ValueError(f"from_cu_seqlens: cu_seqlens must be non-decreasing and end at most at total={total}; "
                         f"got {cu.tolist()}")  # fmt: skip
    pos = torch.arange(total, dtype=torch.int64, device=cu.device)  # (total,)
    ids = torch.searchsorted(cu[1:].contiguous(), pos, right=True) + 1  # sequence i+1 holds cu[i] <= pos < cu[i+1]
    return torch.where(pos < cu[-1], ids, 0).to(torch.int32)[None, :]


def from_position_ids(position_ids: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """(B, T) int32: a new segment (ids 1, 2, ...) at t = 0 and wherever position[t] != position[t - 1] + 1;
    0 where ``keep`` (B, T) is 0/False."""
    _check_int(position_ids, "position_ids", "from_position_ids", 2)
    pos = position_ids.to(torch.int64)
    starts = torch.ones_like(pos, dtype=torch.bool)  # (B, T)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    ids = starts.to(torch.int32).cumsum(dim=1, dtype=torch.int32)
    if keep is None:
        return ids
    kept = from_keep_mask(keep)
    if kept.shape != ids.shape or kept.device != ids.device:
        raise ValueError(f"from_position_ids: keep must be (B, T) = {tuple(ids.shape)} on {ids.device}; got "
                         f"{tuple(keep.shape)} on {keep.device}")  # fmt: skip
    return ids * kept


def visibility(segment_ids: Tensor) -> Tensor:
    """(B, 1, S, S) bool keep mask equivalent to segment_ids (B, S): seg[j] != 0 and seg[i] == seg[j]."""
    seg = segment_ids
    return ((seg[:, None, :] != 0) & (seg[:, :, None] == seg[:, None, :]))[:, None]


def with_mask(attn_mask: Optional[Tensor], segment_ids: Optional[Tensor]) -> Optional[Tensor]:
    """attn_mask (broadcastable to (B, h, T, S)) and segment_ids (B, S) as one mask of attn_mask's kind: the ids'
    (B, 1, T, S) visibility and'ed with a bool attn_mask, -inf over a float one, the visibility alone without
    attn_mask; attn_mask itself without ids."""
    if segment_ids is None:
        return attn_mask
    visible = visibility(segment_ids)  # (B, 1, T, S)
    if attn_mask is None:
        return visible
    if attn_mask.dtype == torch.bool:
        return attn_mask & visible
    hidden = torch.full((), float("-inf"), dtype=attn_mask.dtype, device=attn_mask.device)
    return torch.where(visible, attn_mask, hidden)  # broadcasts both (a (1, 1, 1, S) mask too)


def key_ranges(segment_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(start, end) (B, S) int32: first and last key row i may see (see the module docstring)."""
    seg = segment_ids.to(torch.int64)
    b, s = seg.shape
    idx = torch.arange(s, dtype=torch.int64, device=seg.device).expand(b, s)
    new_run = torch.ones_like(seg, dtype=torch.bool)  # (B, S): a run of equal ids starts here
    new_run[:, 1:] = seg[:, 1:] != seg[:, :-1]
    start = torch.where(new_run, idx, 0).cummax(dim=1).values
    last_run = torch.ones_like(new_run)  # a run ends here
    last_run[:, :-1] = new_run[:, 1:]
    end = torch.where(last_run, idx, s).flip(1).cummin(dim=1).values.flip(1)
    low = torch.iinfo(torch.int64).min
    nz = torch.where(seg != 0, seg, low)
    before = torch.cat([torch.full((b, 1), low, device=seg.device), nz[:, :-1].cummax(dim=1).values], dim=1)
    fresh = ~(new_run & (seg != 0)) | (seg > before)  # every nonzero run's id is new
    contiguous = fresh.all(dim=1, keepdim=True)  # (B, 1)
    start = torch.where(contiguous, start, 0)
    end = torch.where(contiguous, end, s - 1)
    return start.to(torch.int32), end.to(torch.int32)
