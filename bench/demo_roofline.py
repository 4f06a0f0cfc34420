"""The modeled H200 step-time overhead of each demo strategy, from ckpt_ext's roofline cost model (if installed).

The cost model prices one transformer block's training step per checkpointing variant; a model with L blocks of
which every k-th is checkpointed costs (L/k · t_checkpoint + (L - L/k) · t_eager) / (L · t_eager). Embedding, final
LayerNorm and head are left out (the same for every strategy). Returns None when the model is unavailable.
"""

from __future__ import annotations

import importlib
from typing import Optional

FUSED_VARIANTS = {"fused_pointwise": "pointwise", "fused_ffn": "ffn", "fused_block_keep_attn": "block_keep_attn",
                  "fused_block": "block"}  # fmt: skip


def _roofline_module():
    try:
        module = importlib.import_module("ckpt_ext.roofline")
    except ImportError:
        return None
    return module if hasattr(module, "step_time") else None


def roofline_available() -> bool:
    return _roofline_module() is not None


def modeled_overhead(strategy: str, n_layers: int, d_model: int, seq: int, batch: int, n_heads: int,
                     **layer) -> Optional[float]:  # fmt: skip
    """Modeled step time of ``strategy`` / no checkpointing on an H200 in bf16 (blocks only), or None.

    ``layer``: the roofline's layer keywords (activation="swiglu", n_kv_heads, d_ff for the Llama-style model)."""
    roofline = _roofline_module()
    if roofline is None:
        return None
    shape = dict(d_model=d_model, seq=seq, batch=batch, n_heads=n_heads, **layer)
    try:
        eager = roofline.step_time("eager", **shape)
        if strategy == "none":
            return 1.0
        if strategy in FUSED_VARIANTS:
            return roofline.step_time(FUSED_VARIANTS[strategy], **shape) / eager
        if strategy.startswith("ckpt_every_"):
            wrapped = n_layers // int(strategy.rsplit("_", 1)[1])
            ckpt = roofline.step_time("checkpoint", **shape)
            return (wrapped * ckpt + (n_layers - wrapped) * eager) / (n_layers * eager)
    except Exception:  # noqa: BLE001  (a cost model still being written must not break the demo)
        return None
    return None
