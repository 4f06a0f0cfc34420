"""Segment ids: key padding and packed sequences as one compact (B, S) attention argument.

``segment_ids`` (B, S) int32 (int64 accepted): query row i of batch b sees key j iff seg[b, j] > 0 and
|seg[b, i]| == seg[b, j] (and j <= i when causal; the attention ops need T == S). So:

- a positive id s marks a token of sequence s: it sees, and is seen by, the tokens of id s;
- 0 marks padding that takes no part: its query row sees no key (zeros out, lse = -inf, zero gradients) and its key
  is seen by no row (decoders: left padding, packed batches);
- a negative id -s marks a padded token of sequence s: its key is seen by no row, but its query row still sees the
  keys of sequence s. That is an encoder's key-padding mask as Hugging Face computes it (BERT's (B, 1, 1, S)
  additive mask: padded query rows keep attending to the real keys): ``from_key_mask`` gives 1 / -1.

Converters (all return fresh int32 tensors on the input's device and raise ValueError/TypeError naming the argument
on bad input):

- ``from_lengths(lengths (B,), seq_len) -> (B, seq_len)``: right padding, 1 for j < lengths[b], else 0.
- ``from_keep_mask(keep (B, T)) -> (B, T)``: bool or 0/1 keep mask (Hugging Face's 2-D attention_mask): 1 / 0.
- ``from_key_mask(keep (B, T)) -> (B, T)``: the same mask as an encoder's key mask: 1 / -1.
- ``from_cu_seqlens(cu_seqlens (n+1,), total) -> (1, total)``: a flattened varlen batch (FlashAttention's
  cu_seqlens: 0 = c_0 <= c_1 <= ... <= c_n <= total): ids 1..n, positions c_n..total-1 are padding (0).
- ``from_position_ids(position_ids (B, T), keep=None) -> (B, T)``: a new segment wherever the position does not grow
  by exactly 1 from the previous token (how Hugging Face detects packed sequences), ids 1, 2, ... per batch row;
  tokens where ``keep`` is 0/False become padding (0).
- ``visibility(segment_ids (B, S)) -> (B, 1, S, S)`` bool: the equivalent keep mask (causality not included);
  ``with_mask(attn_mask, segment_ids)``: both as one mask of attn_mask's kind (bool and'ed, -inf over a float one).

Tile skipping (kernels that loop over key tiles per query tile, and over query tiles per key tile):

- ``key_ranges(segment_ids) -> (start, end)`` (B, S) int32 each: row i sees no key outside start[i]..end[i];
- ``query_ranges(segment_ids) -> (start, end)``: key j is seen by no row outside start[j]..end[j].

Both are non-decreasing along S, so a tile of rows r0..r1 sees keys start[r0]..end[r1] at most (and a tile of keys
j0..j1 is seen by rows start[j0]..end[j1] at most; with negative ids the two differ: a padded row sees its sequence's
keys, its own key is seen by nobody). They are exact when every |id| of a batch row occupies one contiguous run (each
nonzero run of |seg| exceeds every earlier one: checked on the device, no sync): a row's range is then the first to
last positive key of its run, a key's range its run when its id is positive; a row or key that sees or is seen by
nothing gets an empty range (end < start) inside the monotone envelope (start: the smallest start at or after it,
end: the largest end at or before it). Other layouts get 0 and S - 1.
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


def from_key_mask(keep: Tensor) -> Tensor:
    """(B, T) int32 from a bool or 0/1 key mask (an encoder's padding mask): 1 where kept, -1 where padded (the padded
    position's key is hidden; its query row still sees the kept keys, as in Hugging Face's encoders)."""
    kept = from_keep_mask(keep)
    return kept * 2 - 1


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
    """(B, 1, S, S) bool keep mask equivalent to segment_ids (B, S): seg[j] > 0 and |seg[i]| == seg[j]."""
    seg = segment_ids
    return ((seg[:, None, :] > 0) & (seg.abs()[:, :, None] == seg[:, None, :]))[:, None]


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
    """(start, end) (B, S) int32: row i sees no key outside start[i]..end[i] (see the module docstring)."""
    return _ranges(segment_ids, rows=True)


def query_ranges(segment_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(start, end) (B, S) int32: key j is seen by no row outside start[j]..end[j] (see the module docstring)."""
    return _ranges(segment_ids, rows=False)


def _ranges(segment_ids: Tensor, rows: bool) -> tuple[Tensor, Tensor]:
    seg = segment_ids.to(torch.int64)
    a = seg.abs()  # (B, S): the sequence each position belongs to (0: none)
    b, s = seg.shape
    idx = torch.arange(s, dtype=torch.int64, device=seg.device).expand(b, s)
    new_run = torch.ones_like(a, dtype=torch.bool)  # (B, S): a run of equal |ids| starts here
    new_run[:, 1:] = a[:, 1:] != a[:, :-1]
    run_start = torch.where(new_run, idx, 0).cummax(dim=1).values
    last_run = torch.ones_like(new_run)  # a run ends here
    last_run[:, :-1] = new_run[:, 1:]
    run_end = torch.where(last_run, idx, s).flip(1).cummin(dim=1).values.flip(1)
    if rows:  # the first and last positive key of the row's run
        is_key = seg > 0
        next_key = torch.where(is_key, idx, s).flip(1).cummin(dim=1).values.flip(1)  # first key at or after j
        prev_key = torch.where(is_key, idx, -1).cummax(dim=1).values  # last key at or before j
        start, end = next_key.gather(1, run_start), prev_key.gather(1, run_end)
        seen = (a > 0) & (start <= run_end)
    else:  # a key of positive id is seen by its whole run
        start, end, seen = run_start, run_end, seg > 0
    start = torch.where(seen, start, s).flip(1).cummin(dim=1).values.flip(1)  # monotone envelope: empty ranges
    end = torch.where(seen, end, -1).cummax(dim=1).values  # end < start, inside their neighbours' bounds
    low = torch.iinfo(torch.int64).min
    nz = torch.where(a != 0, a, low)
    before = torch.cat([torch.full((b, 1), low, device=seg.device), nz[:, :-1].cummax(dim=1).values], dim=1)
    fresh = ~(new_run & (a != 0)) | (a > before)  # every nonzero run's |id| is new
    contiguous = fresh.all(dim=1, keepdim=True)  # (B, 1)
    start = torch.where(contiguous, start, 0)
    end = torch.where(contiguous, end, s - 1)
    return start.to(torch.int32), end.to(torch.int32)
