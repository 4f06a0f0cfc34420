"""``apply_checkpointing``: swap every ``every``-th TransformerBlock of a model for a FusedCheckpointBlock in place.

every=1 checkpoints all blocks; every=2 / every=4 are the seed article's "every 2nd / 4th layer" strategies (blocks
are counted in module order, and the ``every``-th, 2·``every``-th, ... are replaced). Parameters are shared, not copied.
"""

from __future__ import annotations

from torch import nn

from .block import FusedCheckpointBlock, TransformerBlock
from .policies import get_policy


def apply_checkpointing(model: nn.Module, policy: str = "block", every: int = 1) -> int:
    """Replace blocks in place; returns how many were replaced. Already-fused blocks get the new policy."""
    get_policy(policy)
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, TransformerBlock)]  # fmt: skip
    replaced = 0
    for i, (parent, name, child) in enumerate(targets, start=1):
        if i % every:
            continue
        if isinstance(child, FusedCheckpointBlock):
            child.policy = policy
        else:
            setattr(parent, name, FusedCheckpointBlock.from_block(child, policy=policy))
        replaced += 1
    return replaced
