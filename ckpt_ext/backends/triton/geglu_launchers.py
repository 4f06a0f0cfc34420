"""Launchers of the GeGLU pointwise kernels (ckpt_ext.kernels.geglu), with the graph ops' signatures.

geglu_fwd(g (N, F), u (N, F)) -> h (N, F) g.dtype           one launch, (rows, column blocks) grid
geglu_bwd(dh, g, u) -> dg (N, F) g.dtype, du (N, F) u.dtype  one launch, same grid
Inputs outside what the kernels cover (dtypes other than fp32/fp16/bf16, empty, not (N, F) pairs) run the reference
math, so every call returns the reference's result.
"""

from __future__ import annotations

import torch

from ... import reference
from ...kernels.geglu import geglu_bwd_kernel, geglu_fwd_kernel
from .launch_utils import cdiv, covered, next_pow2, rows


def _grid(n: int, f: int):
    block = min(next_pow2(f), 1024)
    return (n, cdiv(f, block)), block


def geglu_fwd(g, u):
    if not covered(g, u) or g.dim() != 2 or u.shape != g.shape:
        return reference.geglu_fwd(g, u)
    g, u = rows(g), rows(u)
    n, f = g.shape
    h = torch.empty((n, f), dtype=g.dtype, device=g.device)  # (N, F)
    grid, block = _grid(n, f)
    geglu_fwd_kernel[grid](g, u, h, f, g.stride(0), u.stride(0), BLOCK=block)
    return h


def geglu_bwd(dh, g, u):
    if not covered(dh, g, u) or g.dim() != 2 or u.shape != g.shape or dh.shape != g.shape:
        return reference.geglu_bwd(dh, g, u)
    dh, g, u = rows(dh), rows(g), rows(u)
    n, f = g.shape
    dg = torch.empty((n, f), dtype=g.dtype, device=g.device)  # (N, F)
    du = torch.empty((n, f), dtype=u.dtype, device=u.device)  # (N, F)
    grid, block = _grid(n, f)
    geglu_bwd_kernel[grid](dh, g, u, dg, du, f, dh.stride(0), g.stride(0), u.stride(0), BLOCK=block)
    return dg, du


IMPLS = {"geglu_fwd": geglu_fwd, "geglu_bwd": geglu_bwd}
