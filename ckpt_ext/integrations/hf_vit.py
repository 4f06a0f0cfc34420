"""Hugging Face ViT (``ViTLayer``) adapter: transformers 4.57 and 5.x.

ViTLayer(x) = x1 + Dropout(W_out(gelu(W_in(LN_after(x1))))),  x1 = x + Dropout(W_o(attn(q, k, v))), q|k|v from
LN_before(x) by three separate Linears. Non-causal, exact GELU (``hidden_act="gelu"``; tanh forms also accepted),
scale 1/sqrt(dh), ``attention_probs_dropout_prob`` on the probabilities, ``hidden_dropout_prob`` on both residual
branches, LayerNorm eps ``layer_norm_eps``.

The block takes the three q, k, v weights as they are (``packed_qkv=False``): no concatenated weight is built, and
nothing but the parameters themselves is kept for backward.
Submodule names: 4.57 ``attention.attention.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``,
``output.dense``; 5.x ``attention.{q,k,v,o}_proj``, ``mlp.fc1``, ``mlp.fc2``. 4.57 layers return a tensor, as 5.x's do.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import seeds
from ..block import fused_block
from ..spec import BlockConfig, BlockSpec
from .hf_common import (
    Linears,
    common_fallback,
    eager_rows_ok,
    fallback,
    lora_eager_only,
    lora_seeded,
    needs_graph,
    read_linears,
)
from .hf_gpt2 import FUSED_ATTENTION, GELU_FORMS
from .hf_masks import layer_mask


class _Parts:
    """The linear layers and dropout rates of one ViTLayer, whichever transformers version built it."""

    def __init__(self, layer):
        att = layer.attention
        if hasattr(att, "q_proj"):  # 5.x
            self.q, self.k, self.v, self.o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
            self.fc1, self.fc2 = layer.mlp.fc1, layer.mlp.fc2
            self.paths = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
                          "proj": "attention.o_proj", "fc": "mlp.fc1", "fc2": "mlp.fc2"}  # fmt: skip
            self.p_attn, self.p = att.attention_dropout, layer.dropout.p
            self.p_out = self.p
            self.config = att.config
        else:  # 4.x
            self_att = att.attention
            self.q, self.k, self.v, self.o = self_att.query, self_att.key, self_att.value, att.output.dense
            self.fc1, self.fc2 = layer.intermediate.dense, layer.output.dense
            self.paths = {"q": "attention.attention.query", "k": "attention.attention.key",
                          "v": "attention.attention.value", "proj": "attention.output.dense",
                          "fc": "intermediate.dense", "fc2": "output.dense"}  # fmt: skip
            self.p_attn, self.p = self_att.dropout_prob, att.output.dropout.p
            self.config = self_att.config
            self.p_out = layer.output.dropout.p  # the MLP branch's (the block has one residual p)


class ViTAdapter:
    name = "ViT (ViTModel, ViTForImageClassification, ViTForMaskedImageModeling)"

    def layer_classes(self) -> tuple[type, ...]:
        from transformers.models.vit.modeling_vit import ViTLayer

        return (ViTLayer,)

    def check(self, layer) -> None:
        parts = _Parts(layer)
        cfg = parts.config
        problems = []
        act = cfg.hidden_act if isinstance(cfg.hidden_act, str) else type(cfg.hidden_act).__name__
        if act not in GELU_FORMS:
            problems.append(f"hidden_act={act!r} (supported: {', '.join(GELU_FORMS)})")
        d = layer.layernorm_before.normalized_shape[0]
        if parts.q.out_features != d or parts.o.in_features != d:
            problems.append("attention width != hidden_size (pruned heads or a custom head_dim)")
        lns = (layer.layernorm_before, layer.layernorm_after)
        if not all(ln.elementwise_affine for ln in lns) or lns[0].eps != lns[1].eps:
            problems.append("LayerNorms without affine parameters or with different eps")
        if problems:
            raise ValueError("ViTLayer cannot be fused: " + "; ".join(problems))

    def linears(self, layer, parts: Optional[_Parts] = None) -> dict:
        """LoRA target -> (path in the layer, module) of each linear, 4.57 or 5.x names."""
        parts = _Parts(layer) if parts is None else parts
        return {target: (parts.paths[target], getattr(parts, attr))
                for target, attr in (("q", "q"), ("k", "k"), ("v", "v"), ("proj", "o"), ("fc", "fc1"),
                                     ("fc2", "fc2"))}  # fmt: skip

    def params(self, layer, lin: Linears):
        p = dict(ln1_w=layer.layernorm_before.weight, ln1_b=layer.layernorm_before.bias,
                 ln2_w=layer.layernorm_after.weight, ln2_b=layer.layernorm_after.bias)  # fmt: skip
        for target, base in lin.base.items():
            p[f"w_{target}"], p[f"b_{target}"] = base.weight, base.bias
        p.update(lin.lora_params)
        return p

    def block_config(self, layer, parts: _Parts, specs: tuple = ()) -> BlockConfig:
        p_attn = parts.p_attn if layer.training else 0.0
        p = parts.p if layer.training else 0.0
        seed = seeds.host_seed() if (p > 0.0 or p_attn > 0.0 or lora_seeded(specs)) else 0
        n_heads = parts.config.num_attention_heads
        spec = BlockSpec(n_heads, False, layer.layernorm_before.eps, mlp=GELU_FORMS[parts.config.hidden_act],
                         packed_qkv=False, lora=specs)  # fmt: skip
        return BlockConfig(spec, layer._ckpt_policy, seed, p_attn, p)

    def forward(self, layer, original, bound: dict):
        x = bound["hidden_states"]
        parts = _Parts(layer)
        mask = bound.get("attention_mask")
        lin = read_linears(layer, self.linears(layer, parts)) if torch.is_grad_enabled() else None
        if lin is None:
            return original(*bound["args"], **bound["call_kwargs"])
        params = self.params(layer, lin)
        impl = getattr(parts.config, "_attn_implementation", "eager")
        fusable = (
            needs_graph(x, params.values())
            and bound.get("head_mask") is None
            and not bound.get("output_attentions")
            and not bound["kwargs"].get("output_attentions")
            and common_fallback(layer, impl, FUSED_ATTENTION, mask, lin)
            and lora_eager_only(layer, lin)
            and (
                parts.p_out == parts.p
                or not layer.training
                or fallback(
                    layer,
                    "dropout",
                    "different dropout on the "
                    f"residual branches ({parts.p} after attention, {parts.p_out} after the MLP)",
                )
            )
        )
        info = None
        if fusable and mask is not None:
            info = layer_mask(mask, x.shape[1], False, layer, x.shape[0])
            fusable = eager_rows_ok(layer, impl, info, mask)
        if not fusable:
            return original(*bound["args"], **bound["call_kwargs"])
        out = fused_block(x, params, self.block_config(layer, parts, lin.specs),
                          None if info is None else info.additive(mask))  # fmt: skip
        return (out,) if "output_attentions" in bound else out
