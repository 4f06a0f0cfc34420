"""``apply_checkpointing``: swap every ``every``-th TransformerBlock of a model for a FusedCheckpointBlock in place.

every=1 checkpoints all blocks; every=2 / every=4 are the seed article's "every 2nd / 4th layer" strategies. Blocks
are counted in module order (the order of ``model.modules()``: depth first, children in registration order, so
``first, stack.0, stack.1, last`` is counted in that order) and the ``every``-th, 2·``every``-th, ... are replaced.
A block registered in several places counts once, where it first appears, and every place gets the same fused block.
Parameters are shared, not copied. Argument checks and errors follow ``apply_fused_checkpointing``.
"""

from __future__ import annotations

from torch import nn

from .block import FusedCheckpointBlock, TransformerBlock
from .policies import get_policy


def _block_slots(model: nn.Module) -> dict[int, tuple[TransformerBlock, list[tuple[nn.Module, str]]]]:
    """id(block) -> (block, [(parent, attribute name), ...]) in module order; blocks inside blocks are not searched."""
    found: dict[int, tuple[TransformerBlock, list[tuple[nn.Module, str]]]] = {}
    visited: set[int] = set()

    def visit(parent: nn.Module) -> None:
        for name, child in parent._modules.items():  # not named_children(): it hides a repeated child
            if child is None:
                continue
            if isinstance(child, TransformerBlock):
                found.setdefault(id(child), (child, []))[1].append((parent, name))
            elif id(child) not in visited:
                visited.add(id(child))
                visit(child)

    visit(model)
    return found


def apply_checkpointing(model: nn.Module, policy: str = "block", every: int = 1) -> int:
    """Replace blocks in place; returns how many were replaced. Already-fused blocks get the new policy."""
    policy = get_policy(policy).name
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, TransformerBlock):
        raise TypeError(
            "model: is itself a TransformerBlock (it cannot be replaced in place); use "
            "FusedCheckpointBlock.from_block(block, policy=...) or pass the model that contains it"
        )
    blocks = list(_block_slots(model).values())
    if not blocks:
        raise TypeError(
            f"apply_checkpointing: {type(model).__name__} contains no ckpt_ext.TransformerBlock; "
            "for Hugging Face models use ckpt_ext.integrations.huggingface.apply_fused_checkpointing"
        )
    chosen = blocks[every - 1 :: every]
    for block, slots in chosen:
        if isinstance(block, FusedCheckpointBlock):
            block.policy = policy
            continue
        fused = FusedCheckpointBlock.from_block(block, policy=policy)
        for parent, name in slots:
            setattr(parent, name, fused)
    return len(chosen)
