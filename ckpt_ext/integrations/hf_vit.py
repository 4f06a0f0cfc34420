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

from .. import seeds
from ..block import fused_block
from ..functional import BlockConfig
from .hf_common import common_fallback, eager_rows_ok, needs_graph
from .hf_gpt2 import FUSED_ATTENTION, GELU_FORMS
from .hf_masks import layer_mask


class _Parts:
    """The linear layers and dropout rates of one ViTLayer, whichever transformers version built it."""

    def __init__(self, layer):
        att = layer.attention
        if hasattr(att, "q_proj"):  # 5.x
            self.q, self.k, self.v, self.o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
            self.fc1, self.fc2 = layer.mlp.fc1, layer.mlp.fc2
            self.p_attn, self.p = att.attention_dropout, layer.dropout.p
            self.config = att.config
        else:  # 4.x
            self_att = att.attention
            self.q, self.k, self.v, self.o = self_att.query, self_att.key, self_att.value, att.output.dense
            self.fc1, self.fc2 = layer.intermediate.dense, layer.output.dense
            self.p_attn, self.p = self_att.dropout_prob, att.output.dropout.p
            self.config = self_att.config
            if layer.output.dropout.p != self.p:
                raise ValueError("ViTLayer cannot be fused: different dropout on the two residual branches")


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

    def params(self, layer, parts: _Parts):
        q, k, v = parts.q, parts.k, parts.v
        return dict(
            ln1_w=layer.layernorm_before.weight, ln1_b=layer.layernorm_before.bias, w_q=q.weight, b_q=q.bias,
            w_k=k.weight, b_k=k.bias, w_v=v.weight, b_v=v.bias, w_proj=parts.o.weight, b_proj=parts.o.bias,
            ln2_w=layer.layernorm_after.weight, ln2_b=layer.layernorm_after.bias, w_fc=parts.fc1.weight,
            b_fc=parts.fc1.bias, w_fc2=parts.fc2.weight, b_fc2=parts.fc2.bias,
        )  # fmt: skip

    def block_config(self, layer, parts: _Parts) -> BlockConfig:
        p_attn = parts.p_attn if layer.training else 0.0
        p = parts.p if layer.training else 0.0
        seed = seeds.host_seed() if (p > 0.0 or p_attn > 0.0) else 0
        n_heads = parts.config.num_attention_heads
        return BlockConfig(n_heads, False, layer.layernorm_before.eps, GELU_FORMS[parts.config.hidden_act], p_attn, p,
                           seed, layer._ckpt_policy, packed_qkv=False)  # fmt: skip

    def forward(self, layer, original, bound: dict):
        x = bound["hidden_states"]
        parts = _Parts(layer)
        mask = bound.get("attention_mask")
        direct = (parts.q.weight, parts.fc1.weight, parts.fc2.weight, layer.layernorm_before.weight)
        impl = getattr(parts.config, "_attn_implementation", "eager")
        fusable = (
            needs_graph(x, direct)
            and bound.get("head_mask") is None
            and not bound.get("output_attentions")
            and not bound["kwargs"].get("output_attentions")
            and common_fallback(layer, impl, FUSED_ATTENTION, mask)
        )
        info = None
        if fusable and mask is not None:
            info = layer_mask(mask, x.shape[1], False, layer, x.shape[0])
            fusable = eager_rows_ok(layer, impl, info, mask)
        if not fusable:
            return original(*bound["args"], **bound["call_kwargs"])
        out = fused_block(x, self.params(layer, parts), self.block_config(layer, parts),
                          None if info is None else info.additive(mask))  # fmt: skip
        return (out,) if "output_attentions" in bound else out
