"""The modeled H200 step-time overhead of each demo strategy, from ckpt_ext's roofline cost model (if installed).

The demo trains toy models (d=256) where every op of the cost model sits at its launch floor, so the column would
count kernels, not time. It is priced instead at a realistic shape of the same family (PRICED_SHAPES): the GPT form
at d=2048, 16 heads, T=2048, batch 4 (the seed anchors' large shape) and the Llama form shaped like Llama-3.2-1B
(d=2048, 32 heads of 64, 8 kv heads, SwiGLU d_ff=8192) at T=2048, batch 2, and the BERT form (post-LN,
bidirectional) at BERT-base's d=768, 12 heads, T=512, batch 32, bf16. The cost model prices one block's
training step per checkpointing variant; a model with L blocks of which every k-th is checkpointed costs
(L/k · t_checkpoint + (L - L/k) · t_eager) / (L · t_eager). Embedding, final norm and head are left out (the same
for every strategy). Returns None when the model is unavailable.
"""

from __future__ import annotations

import importlib
from typing import Optional

FUSED_VARIANTS = {"fused_pointwise": "pointwise", "fused_ffn": "ffn", "fused_block_keep_attn": "block_keep_attn",
                  "fused_block": "block"}  # fmt: skip
PRICED_SHAPES = {
    "gpt": dict(d_model=2048, seq=2048, batch=4, n_heads=16),
    "llama": dict(d_model=2048, seq=2048, batch=2, n_heads=32, activation="swiglu", n_kv_heads=8, d_ff=8192),
    "bert": dict(d_model=768, seq=512, batch=32, n_heads=12, placement="post", causal=False),
}


def describe(family: str) -> str:
    s = PRICED_SHAPES[family]
    if family == "llama":
        return (f"Llama-3.2-1B-shaped block (d={s['d_model']}, {s['n_heads']} heads, {s['n_kv_heads']} kv heads, "
                f"d_ff={s['d_ff']}) at T={s['seq']}, batch {s['batch']}")  # fmt: skip
    if family == "bert":
        return (f"BERT-base-shaped post-LN bidirectional block (d={s['d_model']}, {s['n_heads']} heads) at "
                f"T={s['seq']}, batch {s['batch']}")  # fmt: skip
    return f"GPT block at d={s['d_model']}, {s['n_heads']} heads, T={s['seq']}, batch {s['batch']}"


def _roofline_module():
    try:
        module = importlib.import_module("ckpt_ext.roofline")
    except ImportError:
        return None
    return module if hasattr(module, "step_time") else None


def roofline_available() -> bool:
    return _roofline_module() is not None


def modeled_overhead(strategy: str, n_layers: int, family: str) -> Optional[float]:
    """Modeled step time of ``strategy`` / no checkpointing on an H200 in bf16 (blocks only, at the family's
    PRICED_SHAPES shape, with the demo's layer count for the every-k-th strategies), or None."""
    roofline = _roofline_module()
    if roofline is None:
        return None
    shape = PRICED_SHAPES[family]
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
