"""Bytes a training step's forward saves for backward, two ways (both per byte of the block input in bench.block).

saved_bytes(fn, *args, exclude=...): the storages autograd's pack hook sees (``saved_tensors_hooks``), each storage
once, minus the storages of ``exclude`` (the input, parameters, mask, RoPE tables: the caller owns those). This is
what the issue's anchor rows count, and it sees what a torch.compile'd graph saves (its CompiledFunction saves through
autograd). It misses tensors stashed inside torch.utils.checkpoint and selective checkpointing (their own hooks
intercept the saves), so for those eager rows use ckpt_ext.measure.retained_activation_bytes (storages created by the
forward and still alive after it), which in turn cannot see inside compiled code.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef


def saved_bytes(fn: Callable, *args, exclude: Iterable = (), **kwargs) -> tuple[int, object]:
    """(bytes of the distinct storages saved for backward while ``fn(*args)`` runs, minus ``exclude``'s; output)."""
    skip = {StorageWeakRef(t.untyped_storage()) for t in exclude if isinstance(t, torch.Tensor)}
    seen: dict = {}

    def pack(t):
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in skip:
            seen[ref] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return sum(seen.values()), out
