"""PEFT LoRA on a segment's linears: y Wᵀ + b + s·(drop(y) Aᵀ) Bᵀ, and its low-rank backward.

Forward: Δ = s · (drop(y) Aᵀ) Bᵀ, y (N, in) -> (N, out) in the adapter's dtype; a residual-branch linear (proj, fc2)
adds drop_p(Δ) under the branch's own dropout mask before the fused linear_dropout_add. Backward: g = s · dZ B (N, r),
the input gradient drop(g A), dA = gᵀ drop(y), dB = s · dZᵀ (drop(y) Aᵀ) with z = drop(y) Aᵀ recomputed (no policy keeps
anything LoRA-sized). lora_dropout is the hash mask of seed ``spec.seed(cfg.seed)``, replayed in backward.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .dispatch import block_ops as _ops


@functools.lru_cache(maxsize=256)
def _by_target(specs: tuple) -> dict:
    return {s.target: s for s in specs}


def lora_spec(cfg, target: str):
    """The LoraSpec adapting ``target`` in this configuration, or None."""
    return _by_target(cfg.spec.lora).get(target) if cfg.spec.lora else None


def lora_on(cfg, targets) -> bool:
    """Whether LoRA adapts any of ``targets``."""
    return any(lora_spec(cfg, t) is not None for t in targets)


def _masked_input(y: Tensor, spec, cfg) -> Tensor:
    """drop(y) with the target's hash mask (its own adjoint: the same call maps a gradient back)."""
    return _ops.dropout_add(y, None, spec.dropout, spec.seed(cfg.seed)) if spec.dropout > 0.0 else y


def _delta(y: Tensor, p: dict, cfg, spec) -> Tensor:
    """Δ = s · (drop(y) Aᵀ) Bᵀ: y (N, in) -> (N, out), in the adapter's dtype (PEFT casts the input to it)."""
    a = p[spec.a_name]
    z = torch.matmul(_masked_input(y.to(a.dtype), spec, cfg), a.t())  # (N, r)
    return torch.matmul(z * spec.scaling, p[spec.b_name].t())


def lora_add(out: Tensor, y: Tensor, p: dict, cfg, target: str) -> Tensor:
    """out (N, o) + Δ when ``target`` carries LoRA (added in the wider dtype, rounded to out's), else out."""
    spec = lora_spec(cfg, target)
    return out if spec is None else (out + _delta(y, p, cfg, spec)).to(out.dtype)


def lora_residual(residual: Tensor, a: Tensor, p: dict, cfg, target: str, seed) -> Tensor:
    """residual + drop_p(Δ) for a residual-branch linear (proj, fc2): the branch's own dropout mask applied to the
    LoRA update, so ``linear_dropout_add(a, W, b, this, p, seed)`` = residual + drop_p(aWᵀ + b + Δ)."""
    spec = lora_spec(cfg, target)
    if spec is None:
        return residual
    return _ops.dropout_add(_delta(a, p, cfg, spec), residual, cfg.dropout, seed).to(residual.dtype)


def input_grads(pairs, p: dict, cfg):
    """[(target, dZ (N, out))] -> (Σ drop(s · dZ B A) (N, in) or None, [(spec, dZ, g = s · dZ B)] for the A/B grads)."""
    extra, pending = None, []
    for target, dz in pairs:
        spec = lora_spec(cfg, target)
        if spec is None:
            continue
        b = p[spec.b_name]
        gz = torch.matmul(dz.to(b.dtype), b) * spec.scaling  # (N, r)
        term = _masked_input(torch.matmul(gz, p[spec.a_name]), spec, cfg)  # (N, in)
        extra = term if extra is None else extra + term
        pending.append((spec, dz, gz))
    return extra, pending


def lora_wanted(pending, want) -> bool:
    return any(spec.a_name in want or spec.b_name in want for spec, _, _ in pending)


def weight_grads(pending, y: Optional[Tensor], p: dict, cfg, g: dict, want) -> None:
    """dA = gᵀ drop(y) and dB = s · dZᵀ (drop(y) Aᵀ) for each pending target, where ``want`` has them; y (N, in) is
    the linear's input."""
    for spec, dz, gz in pending:
        if spec.a_name not in want and spec.b_name not in want:
            continue
        a, b = p[spec.a_name], p[spec.b_name]
        yd = _masked_input(y.to(a.dtype), spec, cfg)
        if spec.a_name in want:
            g[spec.a_name] = torch.matmul(gz.t(), yd)  # (r, in)
        if spec.b_name in want:
            z = torch.matmul(yd, a.t())  # (N, r), recomputed: no policy keeps it
            g[spec.b_name] = torch.matmul(dz.to(b.dtype).t(), z) * spec.scaling  # (out, r)


def with_input_grad(acc: Tensor, extra: Optional[Tensor]) -> Tensor:
    return acc if extra is None else acc + extra.to(acc.dtype)
