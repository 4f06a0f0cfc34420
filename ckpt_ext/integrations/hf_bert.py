"""Hugging Face post-LN encoder adapters: the BERT family (``BertLayer``, ``RobertaLayer``, ``XLMRobertaLayer``,
``ElectraLayer``) and DistilBERT (``TransformerBlock``); transformers 4.57 and 5.x.

    x1  = LN1(x + Dropout_a(W_o attn(q, k, v) + b_o)),  q, k, v = three Linears of x, bidirectional attention
    out = LN2(x1 + Dropout_m(W_2 act(W_1 x1 + b_1) + b_2))

i.e. BlockSpec(placement="post", packed_qkv=False): the block takes the q, k, v weights as they are (no concatenation
built or kept). Attention scale 1/sqrt(head_dim), dropout on the probabilities, LayerNorm eps from the modules.
Module names: BERT family ``attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm,dropout}``,
``intermediate.dense`` (+ ``intermediate_act_fn``), ``output.{dense,LayerNorm,dropout}``; DistilBERT
``attention.{q,k,v,out}_lin``, ``sa_layer_norm``, ``ffn.lin1/lin2`` (+ ``ffn.activation``), ``output_layer_norm``.
Activations: the module's own object decides (erf GELU: ``gelu``, ``gelu_python``; tanh GELU: ``gelu_new``,
``gelu_pytorch_tanh``, ``gelu_python_tanh``); any other is refused by ``check``.

Dropout: the fused block applies one p to both residual branches. BERT's two (attention.output / output dropout) are
the same config field; DistilBERT drops only the FFN output (the attention output enters sa_layer_norm undropped), so a
DistilBERT block training with ``dropout`` > 0 runs its original forward (warned once); eval or dropout 0 is fused.

Masks (the key-padding mask, one per model forward, converted once: hf_masks.LayerMask.key_ids): BERT eager gets an
additive (B, 1, 1, S) mask, SDPA None or a (B, 1, T, S) mask expanded from the 2-D padding mask (5.x: also a bool
one), DistilBERT eager the raw (B, S) mask; all reach the kernels as (B, T) int32 key ids, 1 kept / -1 padded
(segments.from_key_mask): padded query rows still attend to the real keys, as Hugging Face computes them, and key
tiles of only padding are skipped; no mask tensor reaches the kernels. A 4-D mask whose query rows differ, an
additive bias, or a batch row without any key (Hugging Face's finfo.min softmax gives it uniform weights, the fused
kernels zeros) runs the original forward; under torch.compile, where the mask's values cannot be read, those three
checks are device assertions instead (an error naming the case, never a different number, no graph break; on CUDA a
device-side assert: see hf_masks).

Original forward, warned once with the reason: relative position embeddings (``position_embedding_type`` other than
"absolute"), ``head_mask``, ``output_attentions``, a KV cache, different dropout on the two residual branches, an
attention implementation other than eager/sdpa, hooks or non-plain submodules, an unsupported LoRA form. Silently:
no autograd graph (no_grad, frozen). Refused by ``check`` (ValueError naming the field): ``is_decoder`` /
``add_cross_attention`` (causal or cross attention), unsupported ``hidden_act`` / ``activation``, pruned heads,
LayerNorms without affine parameters or with different eps. Returns what the original returns: a 1-tuple in 4.57 (the
forward takes ``output_attentions``), the tensor in 5.x.
"""

from __future__ import annotations

from typing import Optional

from ..spec import BlockConfig, BlockSpec
from .hf_adapter import (
    LayerAdapter,
    attentions_requested,
    call_seed,
    classes_of,
    layer_fusable,
    part_linears,
)
from .hf_common import Linears, fallback
from .hf_masks import KEY_MASK_CHECKS, layer_mask

# transformers.activations class -> MLP form (GELUActivation: erf, also its python form; the rest: the tanh form)
_ACTIVATIONS = {"GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
                "PytorchGELUTanh": "gelu_tanh"}  # fmt: skip
_ACT_NAMES = "gelu, gelu_python, gelu_new, gelu_pytorch_tanh"
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value")


class _Parts:
    """The modules, names and dropout rates of one encoder layer, whichever family and transformers version built it."""

    def mlp_form(self) -> Optional[str]:
        act = self.act
        if type(act).__module__ != "transformers.activations":
            return None
        return _ACTIVATIONS.get(type(act).__name__)


class _BertParts(_Parts):
    def __init__(self, layer):
        att = layer.attention
        s = att.self
        self.self_att = s
        self.q, self.k, self.v, self.o = s.query, s.key, s.value, att.output.dense
        self.fc1, self.fc2 = layer.intermediate.dense, layer.output.dense
        self.ln1, self.ln2 = att.output.LayerNorm, layer.output.LayerNorm
        self.paths = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                      "proj": "attention.output.dense", "fc": "intermediate.dense", "fc2": "output.dense"}  # fmt: skip
        self.p_attn = s.dropout_prob if hasattr(s, "dropout_prob") else s.dropout.p  # 4.57 SDPA reads dropout_prob
        self.p, self.p_out = att.output.dropout.p, layer.output.dropout.p
        self.n_heads, self.head_size = s.num_attention_heads, s.attention_head_size
        self.act, self.act_field = layer.intermediate.intermediate_act_fn, "hidden_act"
        if hasattr(s, "config"):  # 5.x
            self.impl = getattr(s.config, "_attn_implementation", "eager")
        else:  # 4.57: the self-attention class is chosen by the implementation
            self.impl = "sdpa" if "Sdpa" in type(s).__name__ else "eager"


class _DistilParts(_Parts):
    def __init__(self, layer):
        att = layer.attention
        self.q, self.k, self.v, self.o = att.q_lin, att.k_lin, att.v_lin, att.out_lin
        self.fc1, self.fc2 = layer.ffn.lin1, layer.ffn.lin2
        self.ln1, self.ln2 = layer.sa_layer_norm, layer.output_layer_norm
        self.paths = {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin",
                      "proj": "attention.out_lin", "fc": "ffn.lin1", "fc2": "ffn.lin2"}  # fmt: skip
        self.p_attn = att.dropout_prob if hasattr(att, "dropout_prob") else att.dropout.p
        self.p, self.p_out = 0.0, layer.ffn.dropout.p  # no dropout on the attention branch
        self.n_heads, self.head_size = att.n_heads, att.attention_head_size
        self.act, self.act_field = layer.ffn.activation, "activation"
        self.impl = getattr(att.config, "_attn_implementation", "eager")


class _EncoderAdapter(LayerAdapter):
    """The fused-or-fallback logic shared by the BERT family and DistilBERT (``parts`` reads a layer's modules)."""

    parts = _Parts

    def check(self, layer) -> None:
        """Raise ValueError naming every field the fused block does not compute."""
        parts = self.parts(layer)
        problems = []
        if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False):
            problems.append("is_decoder / add_cross_attention (causal and cross attention are not fused; use the "
                            "model as an encoder)")  # fmt: skip
        if parts.mlp_form() is None:
            act = type(parts.act)
            problems.append(f"{parts.act_field}: {act.__module__}.{act.__qualname__} (supported: {_ACT_NAMES})")
        d = parts.ln1.normalized_shape[0]
        width = parts.n_heads * parts.head_size
        if parts.q.out_features != d or parts.o.in_features != d or width != d:
            problems.append("attention width != hidden size (pruned heads or a custom head size)")
        lns = (parts.ln1, parts.ln2)
        if not all(ln.elementwise_affine and ln.bias is not None for ln in lns) or lns[0].eps != lns[1].eps:
            problems.append("LayerNorms without affine parameters or with different eps")
        if problems:
            raise ValueError(f"{type(layer).__name__.removeprefix('Fused')} cannot be fused: " + "; ".join(problems))

    def read(self, layer) -> _Parts:
        return self.parts(layer)

    def linears(self, layer, parts: Optional[_Parts] = None) -> dict:
        """LoRA target -> (path in the layer, module) of each linear (a PEFT LoRA layer where one is injected)."""
        return part_linears(self.parts(layer) if parts is None else parts)

    def norms(self, layer, parts: _Parts) -> dict:
        return dict(ln1_w=parts.ln1.weight, ln1_b=parts.ln1.bias, ln2_w=parts.ln2.weight, ln2_b=parts.ln2.bias)

    def hidden(self, bound: dict):
        return _arg(bound, "hidden_states", "x")

    def block_config(self, layer, parts: _Parts, specs: tuple = ()) -> BlockConfig:
        p_attn = parts.p_attn if layer.training else 0.0
        p = parts.p_out if layer.training else 0.0  # equal to parts.p whenever training (else the original runs)
        seed = call_seed(p, p_attn, specs)
        spec = BlockSpec(parts.n_heads, False, parts.ln1.eps, placement="post", mlp=parts.mlp_form(),
                         packed_qkv=False, lora=specs)  # fmt: skip
        return BlockConfig(spec, layer._ckpt_policy, seed, p_attn, p)

    def fused_args(self, layer, parts: _Parts, bound: dict, lin: Linears):
        """False to run the original forward, else (None, None, (B, T) int32 key ids or None): attn_mask,
        position_embeddings, segment_ids."""
        x = _arg(bound, "hidden_states", "x")
        extra = bound["kwargs"]
        if attentions_requested(bound):
            return fallback(layer, "output-attentions", "output_attentions=True (the fused block keeps no weights)")
        if bound.get("head_mask") is not None or extra.get("head_mask") is not None:
            return fallback(layer, "head-mask", "a head_mask")
        if any(bound.get(k) is not None or extra.get(k) is not None for k in _CACHE_ARGS):
            return fallback(layer, "cache", "a KV cache (decoder use)")
        if bound.get("encoder_hidden_states") is not None and getattr(layer, "is_decoder", False):
            return fallback(layer, "cross-attention", "cross-attention (encoder_hidden_states)")
        position = getattr(getattr(parts, "self_att", None), "position_embedding_type", "absolute")
        if position != "absolute":
            return fallback(layer, f"position-{position}", f"position_embedding_type={position!r} (relative "
                            "position scores are not fused; 'absolute' is)")  # fmt: skip
        mask = _arg(bound, "attention_mask", "attn_mask")
        if not layer_fusable(layer, parts.impl, mask, lin, (parts.p, parts.p_out)):
            return False
        if mask is None:
            return (None,)
        key = layer_mask(mask, x.shape[1], False, layer, x.shape[0]).key_ids(mask)
        if key.failed is not None:
            return fallback(layer, key.failed, KEY_MASK_CHECKS[key.failed])
        return None, None, key.ids


def _arg(bound: dict, name: str, name_457: str):
    """An argument by its 5.x / BERT name or DistilBERT 4.57's (``x``, ``attn_mask``)."""
    return bound[name_457] if name_457 in bound else bound.get(name)


class BertFamilyAdapter(_EncoderAdapter):
    name = "BERT, RoBERTa, XLM-R, ELECTRA (*Model, *ForMaskedLM, *ForSequenceClassification, *For...)"
    parts = _BertParts

    def layer_classes(self) -> tuple[type, ...]:
        return classes_of((("bert", "BertLayer"), ("roberta", "RobertaLayer"), ("xlm_roberta", "XLMRobertaLayer"),
                         ("electra", "ElectraLayer")))  # fmt: skip


class DistilBertAdapter(_EncoderAdapter):
    name = "DistilBERT (DistilBertModel, DistilBertFor*)"
    parts = _DistilParts

    def layer_classes(self) -> tuple[type, ...]:
        return classes_of((("distilbert", "TransformerBlock"),))
