"""The norm segments (norm1, norm2): LayerNorm or RMSNorm forward with fp32 row statistics, and their backward.

x (N, d) -> y (N, d) and statistics: LayerNorm (mean, rstd), RMSNorm (rstd,), each (N,) fp32 — what the policies keep
instead of y. The backward rebuilds x̂ from x and the statistics inside the kernel, adds the residual gradient
(``dresidual``) in its epilogue and can emit y again (``emit_y``) for the dW GEMMs that read it. Spec fields:
``norm`` (kind), ``norm_bias`` (LayerNorm β; absent = zeros), ``norm_offset`` (the weight is used as offset + γ, as
Gemma's 1 + γ: dγ is the same), ``eps``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .dispatch import block_ops as _ops


def ln_params(w: Optional[Tensor], b: Optional[Tensor], d: int, like: Tensor, spec) -> tuple[Tensor, Tensor]:
    """LayerNorm (γ + offset, β), ones / zeros for an absent one."""
    w = w if w is not None else torch.ones(d, dtype=like.dtype, device=like.device)
    b = b if b is not None else torch.zeros(d, dtype=like.dtype, device=like.device)
    return _offset(w, spec), b


def _offset(w: Tensor, spec) -> Tensor:
    return w + spec.norm_offset if spec.norm_offset else w


def norm_fwd(x: Tensor, p: dict, which: str, cfg) -> tuple[Tensor, tuple[Tensor, ...]]:
    """x (N, d) -> norm output (N, d), fp32 statistics: (mean, rstd) for LayerNorm, (rstd,) for RMSNorm."""
    spec = cfg.spec
    if spec.norm == "rmsnorm":
        y, rstd = _ops.rms_norm_fwd(x, _offset(p[f"{which}_w"], spec), spec.eps)
        return y, (rstd,)
    w, b = ln_params(p[f"{which}_w"], p[f"{which}_b"], x.shape[1], x, spec)
    y, mean, rstd = _ops.layer_norm_fwd(x, w, b, spec.eps)
    return y, (mean, rstd)


def norm_bwd(dy, x, stats, p: dict, which: str, cfg, dresidual, emit_y: bool, g: dict, want):
    """dx (N, d) (+ dresidual) and the norm's weight grads into g where ``want`` has them (the ops reduce dγ, dβ
    anyway: they have no switch); returns (dx, y or an empty tensor)."""
    spec = cfg.spec
    if spec.norm == "rmsnorm":
        dx, dw, y = _ops.rms_norm_bwd(dy.contiguous(), x, stats[0], _offset(p[f"{which}_w"], spec), dresidual, emit_y)
        db = None
    else:
        w, b = ln_params(p[f"{which}_w"], p[f"{which}_b"], x.shape[1], x, spec)
        dx, dw, db, y = _ops.layer_norm_bwd(dy.contiguous(), x, stats[0], stats[1], w, b, dresidual, emit_y)
    g.update((f"{which}_{s}", t) for s, t in (("w", dw), ("b", db)) if f"{which}_{s}" in want)
    return dx, y


def norm_bwd_from_output(dy, y, stats, p: dict, which: str, cfg, g: dict, want):
    """The norm's backward from its *output* y (N, d) and statistics, without its input (DeepSpeed's invertible
    LayerNorm): x̂ = (y - β) / γ (RMSNorm: y / γ), then the same backward op on x̂ with unit statistics, whose dx is
    the true dx divided by rstd (LayerNorm: dx = rstd·(g - mean(g) - x̂·mean(g·x̂)), g = γ·dy; RMSNorm without the
    mean): one row scale restores it; dγ = Σ dy·x̂ and dβ = Σ dy need no statistics. Exact where γ has no tiny
    entries: ``invertible`` decides."""
    spec = cfg.spec
    n = y.shape[0]
    ones = torch.ones(n, dtype=torch.float32, device=y.device)  # (N,) unit rstd
    if spec.norm == "rmsnorm":
        w = _offset(p[f"{which}_w"], spec)
        xhat = y / w  # (N, d)
        dx, dw, _ = _ops.rms_norm_bwd(dy.contiguous(), xhat, ones, w, None, False)
        db, rstd = None, stats[0]
    else:
        w, b = ln_params(p[f"{which}_w"], p[f"{which}_b"], y.shape[1], y, spec)
        xhat = (y - b) / w  # (N, d)
        dx, dw, db, _ = _ops.layer_norm_bwd(dy.contiguous(), xhat, torch.zeros_like(ones), ones, w, b, None, False)
        rstd = stats[1]
    g.update((f"{which}_{s}", t) for s, t in (("w", dw), ("b", db)) if f"{which}_{s}" in want)
    return (dx * rstd[:, None]).to(dx.dtype)


MIN_GAMMA = 1e-2  # smallest |γ| (relative to max |γ|) for which x̂ = (y - β)/γ is rebuilt (tests/test_block_spec.py)


def invertible(w: Optional[Tensor], y_dtype: torch.dtype, spec) -> bool:
    """Whether norm2's backward may rebuild x̂ from the output: fp32/fp64 outputs (a bf16 output has 8 bits: x̂ would
    carry its rounding, amplified by 1/γ) and no |γ| below MIN_GAMMA·max|γ|. γ without values (meta or fake tensors:
    the planner's and roofline's traces) counts as well-conditioned. Reading γ costs one host sync. For a frozen γ
    (requires_grad False: PEFT LoRA fine-tuning, inference-mode evaluation) the answer is cached on γ's tensor, keyed
    on its version counter (in-place writes such as load_state_dict bump it), storage, dtype and the spec's offset. A
    trainable γ is read at every call: fused optimizers (torch's AdamW(fused=True), the Trainer's default) update
    parameters without bumping the version counter, so no key would see their steps."""
    if y_dtype not in (torch.float32, torch.float64):
        return False
    if w is None or w.device.type == "meta" or is_fake(w):
        return True
    key = (w._version, w.untyped_storage().data_ptr(), w.storage_offset(), w.dtype, spec.norm_offset)
    cached = None if w.requires_grad else getattr(w, "_ckpt_invertible", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    mag = (w.detach() + spec.norm_offset).abs()
    ok = bool(mag.min() >= MIN_GAMMA * mag.max()) and bool(mag.max() > 0)
    if not w.requires_grad:
        w._ckpt_invertible = (key, ok)  # lives as long as γ
    return ok
