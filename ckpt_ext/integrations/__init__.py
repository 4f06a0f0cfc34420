"""Integrations with model libraries. ``huggingface``: ``apply_fused_checkpointing`` for GPT-2 and ViT models.

Nothing here imports transformers until a function is called, so ``import ckpt_ext`` never needs it.
"""

from .huggingface import apply_fused_checkpointing, remove_fused_checkpointing

__all__ = ["apply_fused_checkpointing", "remove_fused_checkpointing"]
