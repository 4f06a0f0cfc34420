"""Launchers of the gated-MLP pointwise kernels (ckpt_ext.kernels.gated), with the graph ops' signatures: one launcher
pair serves every gate (SwiGLU: silu, GeGLU: tanh-form gelu).

swiglu_fwd / geglu_fwd(g (N, F), u (N, F)) -> h (N, F) g.dtype           one launch, (rows, column blocks) grid
swiglu_bwd / geglu_bwd(dh, g, u) -> dg (N, F) g.dtype, du (N, F) u.dtype  one launch, same grid
Inputs outside what the kernels cover (dtypes other than fp32/fp16/bf16, empty, not (N, F) pairs) run the reference
math, so every call returns the reference's result.
"""

from __future__ import annotations

import functools

import torch

from ... import reference
from ...kernels.gated import GELU_TANH, SILU, gated_bwd_kernel, gated_fwd_kernel
from .launch_utils import cdiv, covered, next_pow2, rows

GATES = {"swiglu": SILU.value, "geglu": GELU_TANH.value}  # op prefix -> the kernels' GATE


def _grid(n: int, f: int):
    block = min(next_pow2(f), 1024)
    return (n, cdiv(f, block)), block


def gated_fwd(op: str, g, u):
    """h = gate(g) · u for op "swiglu" or "geglu" (reference.<op>_fwd where the kernel does not cover the inputs)."""
    if not covered(g, u) or g.dim() != 2 or u.shape != g.shape:
        return getattr(reference, f"{op}_fwd")(g, u)
    g, u = rows(g), rows(u)
    n, f = g.shape
    h = torch.empty((n, f), dtype=g.dtype, device=g.device)  # (N, F)
    grid, block = _grid(n, f)
    gated_fwd_kernel[grid](g, u, h, f, g.stride(0), u.stride(0), GATE=GATES[op], BLOCK=block)
    return h


def gated_bwd(op: str, dh, g, u):
    """(dg, du) of h = gate(g) · u for op "swiglu" or "geglu"."""
    if not covered(dh, g, u) or g.dim() != 2 or u.shape != g.shape or dh.shape != g.shape:
        return getattr(reference, f"{op}_bwd")(dh, g, u)
    dh, g, u = rows(dh), rows(g), rows(u)
    n, f = g.shape
    dg = torch.empty((n, f), dtype=g.dtype, device=g.device)  # (N, F)
    du = torch.empty((n, f), dtype=u.dtype, device=u.device)  # (N, F)
    grid, block = _grid(n, f)
    gated_bwd_kernel[grid](dh, g, u, dg, du, f, dh.stride(0), g.stride(0), u.stride(0), GATE=GATES[op], BLOCK=block)
    return dg, du


swiglu_fwd = functools.partial(gated_fwd, "swiglu")
swiglu_bwd = functools.partial(gated_bwd, "swiglu")
geglu_fwd = functools.partial(gated_fwd, "geglu")
geglu_bwd = functools.partial(gated_bwd, "geglu")

IMPLS = {"swiglu_fwd": swiglu_fwd, "swiglu_bwd": swiglu_bwd, "geglu_fwd": geglu_fwd, "geglu_bwd": geglu_bwd}
