"""``LayerAdapter``: the one skeleton every Hugging Face family adapter fills in.

huggingface.py swaps a layer's class and calls ``adapter.forward(layer, original, bound)`` on every call (``bound``:
the call's arguments by name, hf_common.bind). The skeleton runs

    parts = read(layer)                                  the layer's modules, once per call
    lin   = read_linears(layer, linears(layer, parts))   plain or PEFT LoRA linears (None: not fusable, warned)
    params = norms(layer, parts) + each linear's weight(base) and bias + LoRA A/B
    args  = fused_args(layer, parts, bound, lin)         (attn_mask, position_embeddings, segment_ids) or False
    out   = fused_block(hidden(bound), params, block_config(layer, parts, specs), *args)
    return output(out, bound)

and the original forward wherever grad is off, nothing needs a gradient, or ``fused_args`` says False (having named
the reason once via hf_common.fallback where it is not an inference or attention-output call). A family writes what
differs: ``name``, ``layer_classes``, ``check`` (the config fields it cannot run, named), ``linears``, ``norms``,
``block_config`` (its BlockSpec) and ``fused_args`` (its masks, RoPE tables, cache and dropout rules).
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import seeds
from ..block import fused_block
from ..lora import Linears
from .hf_common import common_fallback, fallback, lora_eager_only, lora_seeded, needs_graph, read_linears


class LayerAdapter:
    name = "?"

    def layer_classes(self) -> tuple[type, ...]:
        raise NotImplementedError

    def check(self, layer) -> None:
        raise NotImplementedError

    def read(self, layer):
        """The layer's modules as the other hooks use them (default: the layer itself)."""
        return layer

    def linears(self, layer, parts) -> dict:
        """LoRA target -> (path in the layer, module) of each linear."""
        raise NotImplementedError

    def norms(self, layer, parts) -> dict:
        """The norm tensors by block parameter name (ln1_w, ln1_b, ln2_w, ...)."""
        raise NotImplementedError

    def block_config(self, layer, parts, specs: tuple) -> object:
        raise NotImplementedError

    def fused_args(self, layer, parts, bound: dict, lin: Linears):
        """False to run the original forward, else (attn_mask, position_embeddings, segment_ids) for fused_block."""
        raise NotImplementedError

    def hidden(self, bound: dict):
        return bound["hidden_states"]

    def weight(self, base):
        """The (out, in) weight of a base linear."""
        return base.weight

    def output(self, out, bound: dict):
        return (out,) if "output_attentions" in bound else out

    def params(self, layer, parts, lin: Linears) -> dict:
        p = dict(self.norms(layer, parts))
        for target, base in lin.base.items():
            p[f"w_{target}"], p[f"b_{target}"] = self.weight(base), base.bias
        p.update(lin.lora_params)
        return p

    def forward(self, layer, original, bound: dict):
        parts = self.read(layer)
        x = self.hidden(bound)
        lin = read_linears(layer, self.linears(layer, parts)) if torch.is_grad_enabled() else None
        params = None if lin is None else self.params(layer, parts, lin)
        args = (
            False
            if params is None or not needs_graph(x, params.values())
            else self.fused_args(layer, parts, bound, lin)
        )
        if args is False:
            return original(*bound["args"], **bound["call_kwargs"])
        return self.output(fused_block(x, params, self.block_config(layer, parts, lin.specs), *args), bound)


def call_seed(p: float, p_attn: float, specs: tuple) -> int:
    """This call's dropout seed: drawn only when some dropout is on (0 keeps the call deterministic and cheap)."""
    return seeds.host_seed() if (p > 0.0 or p_attn > 0.0 or lora_seeded(specs)) else 0


def classes_of(pairs) -> tuple[type, ...]:
    """The layer classes named by (model family, class name) pairs that this transformers install has."""
    classes = []
    for family, name in pairs:
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue
        classes.append(getattr(module, name))
    return tuple(classes)


def first_given(bound: dict, names) -> Optional[object]:
    """The first of ``names`` given (not None) among the call's named arguments or its extra kwargs."""
    return next((src[k] for src in (bound, bound["kwargs"]) for k in names if src.get(k) is not None), None)


def attentions_requested(bound: dict) -> bool:
    return bool(bound.get("output_attentions") or bound["kwargs"].get("output_attentions"))


_PART_LINEARS = (("q", "q"), ("k", "k"), ("v", "v"), ("proj", "o"), ("fc", "fc1"), ("fc2", "fc2"))


def part_linears(parts) -> dict:
    """LoRA target -> (path, module) for a layer reader with attributes q, k, v, o, fc1, fc2 and ``paths`` by target
    (the encoder and ViT readers: separate q/k/v, one MLP input linear)."""
    return {target: (parts.paths[target], getattr(parts, attr)) for target, attr in _PART_LINEARS}


def same_residual_dropout(layer, p_attention: float, p_mlp: float) -> bool:
    """The fused block applies one dropout p to both residual branches: True where the layer's agree (or it is in
    eval mode), else the layer runs its original forward, said once."""
    if not layer.training or p_attention == p_mlp:
        return True
    return fallback(layer, "dropout", f"different dropout on the residual branches ({p_attention} after the attention, "
                    f"{p_mlp} after the MLP); eval() or equal probabilities are fused")  # fmt: skip


FUSED_ATTENTION = ("eager", "sdpa")  # attention implementations whose math the fused kernels reproduce


def layer_fusable(layer, impl: str, mask, lin: Linears, dropouts: Optional[tuple[float, float]] = None) -> bool:
    """The checks every family makes before its own: the attention implementation, the mask's type and the layer's
    submodules and hooks (hf_common.common_fallback), LoRA only in eager mode, and — given (p after attention, p after
    the MLP) — one residual dropout. False where the original forward must run (said once where it is a training
    call)."""
    if not common_fallback(layer, impl, FUSED_ATTENTION, mask, lin) or not lora_eager_only(layer, lin):
        return False
    return dropouts is None or same_residual_dropout(layer, *dropouts)
