"""What every segment shares: the forward's autocast state and small gradient helpers (row sums, Σ dZ·W, the
residual dropout's adjoint).

Shapes: N rows (B*T tokens), d the block width; dZ (N, out) the gradient of a linear's output, W (out, K) its weight.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .dispatch import block_ops as _ops


class AutocastState:
    """The forward's autocast state, re-entered for recompute and backward (disabled on devices without autocast)."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        try:
            self.enabled = torch.is_autocast_enabled(device_type)
        except RuntimeError:  # e.g. "meta": no autocast there
            self.enabled = False
        self.dtype = torch.get_autocast_dtype(device_type) if self.enabled else None

    def __call__(self):
        """Enter exactly this state: also *disabled*, so an autocast around backward (or recompute) that the forward
        did not run under does not leak into it. Devices autocast does not know (meta): nothing to enter."""
        if not torch.amp.is_autocast_available(self.device_type):
            return contextlib.nullcontext()
        if not self.enabled:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype)

    def mm(self, t: Optional[Tensor]) -> Optional[Tensor]:
        """Cast an input of a fused matmul op (or of attention) the way autocast casts an aten matmul's."""
        if t is None:
            return None
        return t.to(self.dtype) if self.enabled and t.is_floating_point() else t


def sum_rows(t: Tensor, like: Optional[Tensor]) -> Optional[Tensor]:
    """Σ over rows of t (N, k), in like's dtype; None where there is no bias."""
    if like is None:
        return None
    s = t.sum(dim=0)
    return s if s.dtype == like.dtype else s.to(like.dtype)


def input_grad(pairs) -> Tensor:
    """Σ dZ @ W over (dZ (N, out), W (out, K)) pairs: the gradient of the input the projections share."""
    (dz, w), *rest = pairs
    acc = torch.matmul(dz, w)
    for dz, w in rest:
        acc = torch.addmm(acc, dz, w)
    return acc


def dropout_grad(grad: Tensor, p: float, seed: int) -> Tensor:
    """Gradient through a residual branch's dropout: the same hash mask, replayed from the seed."""
    return _ops.dropout_add(grad, None, p, seed) if p > 0.0 else grad


def bias_or_zeros(b: Optional[Tensor], w: Tensor) -> Tensor:
    return b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)


def wanted(p: dict, needs) -> frozenset:
    """The names of the present parameters whose gradient is wanted: all (``needs`` None) or those in ``needs``."""
    return frozenset(n for n, t in p.items() if t is not None and (needs is None or n in needs))
