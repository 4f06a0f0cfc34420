"""``save_layout(spec, policy, rope)``: the exact list of tensors a fused block saves for backward, for every runtime.

The policy table (policies.py) names what a policy keeps; each segment (block_parts/) declares how many tensors each
name is in a given form (``saves``: LayerNorm keeps two statistics, RMSNorm one; qkv is one packed tensor or three;
a gated MLP has two pre-activations). The layout is their product: ((name, count), ...) in table order, x excluded
(the caller owns it), names the form does not have left out. The eager autograd.Function and the compiled block's
opaque ops both flatten and rebuild their saved tensors with it; the memory tests price the same table.
"""

from __future__ import annotations

import functools

from torch import Tensor

from .block_parts import attention, mlp
from .policies import get_policy
from .spec import BlockSpec

# names that hold one tensor in acts (the others hold a tuple)
_SINGLE = ("x", "ln1_out", "attn_out", "attn_lse", "x1", "ln2_out", "act_out", "h1", "h2", "out")


@functools.lru_cache(maxsize=512)
def save_layout(spec: BlockSpec, policy: str, rope: bool, ln2_from_out: bool = False) -> tuple[tuple[str, int], ...]:
    """((name, tensor count), ...) the block saves beyond x under ``policy``, in policies.ALL_TENSORS order.
    ``ln2_from_out`` (post-LN): the block's output ``out`` (owned by the caller: 0 bytes) stands in for h2."""
    counts = {**attention.saves(spec, rope), **mlp.saves(spec)}
    if ln2_from_out:
        keeps = tuple("out" if name == "h2" else name for name in get_policy(policy, spec.placement).keeps)
        return tuple((name, counts.get(name, 1)) for name in keeps if name != "x" and counts.get(name, 1))
    return tuple(
        (name, counts[name]) for name in get_policy(policy, spec.placement).keeps if name != "x" and counts[name]
    )


def flatten(acts: dict, layout) -> list[Tensor]:
    """The saved tensors of ``acts`` (names -> tensor or tuple) in layout order; a count mismatch raises."""
    flat = []
    for name, count in layout:
        value = acts[name] if isinstance(acts[name], tuple) else (acts[name],)
        if len(value) != count:
            raise RuntimeError(f"ckpt_ext: {name} holds {len(value)} tensors, the save layout says {count}")
        flat.extend(value)
    return flat


def unflatten(tensors, layout) -> dict:
    """Inverse of flatten: names -> tensor (single names) or tuple."""
    it = iter(tensors)
    acts = {}
    for name, count in layout:
        value = tuple(next(it) for _ in range(count))
        acts[name] = value[0] if name in _SINGLE else value
    return acts
