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

from ..spec import BlockConfig, BlockSpec
from .hf_adapter import (
    LayerAdapter,
    attentions_requested,
    call_seed,
    layer_fusable,
    part_linears,
)
from .hf_common import Linears, eager_rows_ok
from .hf_gpt2 import GELU_FORMS
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


class ViTAdapter(LayerAdapter):
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

    def read(self, layer) -> _Parts:
        return _Parts(layer)

    def linears(self, layer, parts: Optional[_Parts] = None) -> dict:
        """LoRA target -> (path in the layer, module) of each linear, 4.57 or 5.x names."""
        return part_linears(_Parts(layer) if parts is None else parts)

    def norms(self, layer, parts) -> dict:
        return dict(ln1_w=layer.layernorm_before.weight, ln1_b=layer.layernorm_before.bias,
                    ln2_w=layer.layernorm_after.weight, ln2_b=layer.layernorm_after.bias)  # fmt: skip

    def block_config(self, layer, parts: _Parts, specs: tuple = ()) -> BlockConfig:
        p_attn = parts.p_attn if layer.training else 0.0
        p = parts.p if layer.training else 0.0
        seed = call_seed(p, p_attn, specs)
        n_heads = parts.config.num_attention_heads
        spec = BlockSpec(n_heads, False, layer.layernorm_before.eps, mlp=GELU_FORMS[parts.config.hidden_act],
                         packed_qkv=False, lora=specs)  # fmt: skip
        return BlockConfig(spec, layer._ckpt_policy, seed, p_attn, p)

    def fused_args(self, layer, parts: _Parts, bound: dict, lin: Linears):
        """False to run the original forward, else (the additive attention mask or None,)."""
        x, mask = bound["hidden_states"], bound.get("attention_mask")
        impl = getattr(parts.config, "_attn_implementation", "eager")
        if bound.get("head_mask") is not None or attentions_requested(bound):
            return False
        if not layer_fusable(layer, impl, mask, lin, (parts.p, parts.p_out)):
            return False
        if mask is None:
            return (None,)
        info = layer_mask(mask, x.shape[1], False, layer, x.shape[0])
        return (info.additive(mask),) if eager_rows_ok(layer, impl, info, mask) else False
