"""Hugging Face GPT-2 (``GPT2Block``) adapter: transformers 4.57 and 5.x.

GPT2Block(x) = x1 + Dropout(mlp.c_proj(gelu_new(mlp.c_fc(ln_2(x1))))),
           x1 = x + Dropout(attn.c_proj(causal_attention(attn.c_attn(ln_1(x)))))
with Conv1D layers (weight [in, out], y = x @ W + b): the fused block gets the views ``W.t()`` (out, in), no copies.
c_attn's output is q | k | v with heads contiguous inside each (B, T, 3d), the layout ckpt_ext's attention reads.
Attention scale 1/sqrt(dh) (``scale_attn_weights``), probabilities dropped with ``attn_pdrop``, both residual branches
with ``resid_pdrop``, LayerNorm eps ``layer_norm_epsilon``, ``gelu_new`` = GELU's tanh form.

Fused path: autograd records the call, no attention weights or head mask are requested, no cross-attention input,
attention implementation eager or sdpa (eager only with a mask that leaves every query row a key), plain submodules
without hooks, and no KV cache with earlier tokens for this layer. A cache that is still
empty is left unfilled only while the layer trains (``use_cache=True`` is GPT-2's default, also while training), as
Hugging Face's own gradient checkpointing does; in eval() a requested cache is always filled, by the original forward.
Everything else (generate, no_grad, output_attentions, ...) runs the original forward.
Return value: 4.57 blocks return a tuple (hidden_states,); 5.x blocks return the tensor.
"""

from __future__ import annotations

from torch import Tensor

from ..spec import BlockConfig, BlockSpec
from .hf_adapter import LayerAdapter, attentions_requested, call_seed, first_given, layer_fusable
from .hf_common import Linears, eager_rows_ok, warn_once
from .hf_masks import layer_mask

GELU_FORMS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}  # HF name -> MLP form
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class GPT2Adapter(LayerAdapter):
    name = "GPT-2 (GPT2Model, GPT2LMHeadModel, GPT2DoubleHeadsModel, GPT2For*)"

    def layer_classes(self) -> tuple[type, ...]:
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        return (GPT2Block,)

    def check(self, layer) -> None:
        """Raise ValueError for a configuration the fused block does not compute."""
        cfg, attn = layer.attn.config, layer.attn
        problems = []
        if getattr(cfg, "add_cross_attention", False) or hasattr(layer, "crossattention"):
            problems.append("add_cross_attention=True (cross-attention sits between the block's halves)")
        if not getattr(cfg, "scale_attn_weights", True):
            problems.append("scale_attn_weights=False (the fused attention scales by 1/sqrt(head_dim))")
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            problems.append("scale_attn_by_inverse_layer_idx=True")
        if cfg.activation_function not in GELU_FORMS:
            problems.append(f"activation_function={cfg.activation_function!r} (supported: {', '.join(GELU_FORMS)})")
        if getattr(attn, "pruned_heads", None) or attn.split_size != attn.embed_dim:
            problems.append("pruned attention heads")
        if abs(getattr(attn, "scaling", attn.head_dim**-0.5) - attn.head_dim**-0.5) > 1e-12:
            problems.append(f"attention scaling {attn.scaling} != 1/sqrt(head_dim)")
        if not (layer.ln_1.elementwise_affine and layer.ln_2.elementwise_affine) or layer.ln_1.eps != layer.ln_2.eps:
            problems.append("LayerNorms without affine parameters or with different eps")
        if problems:
            raise ValueError("GPT2Block cannot be fused: " + "; ".join(problems))

    def linears(self, layer, parts=None) -> dict:
        """LoRA target -> (path in the layer, module) of each Conv1D (a PEFT LoRA layer where one is injected)."""
        a, m = layer.attn, layer.mlp
        return {"qkv": ("attn.c_attn", a.c_attn), "proj": ("attn.c_proj", a.c_proj), "fc": ("mlp.c_fc", m.c_fc),
                "fc2": ("mlp.c_proj", m.c_proj)}  # fmt: skip

    def norms(self, layer, parts) -> dict:
        return dict(ln1_w=layer.ln_1.weight, ln1_b=layer.ln_1.bias, ln2_w=layer.ln_2.weight, ln2_b=layer.ln_2.bias)

    def weight(self, base):
        return base.weight.t()  # Conv1D holds (in, out): an (out, in) view

    def block_config(self, layer, parts=None, specs: tuple = ()) -> BlockConfig:
        cfg = layer.attn.config
        p_attn = layer.attn.attn_dropout.p if layer.training else 0.0  # the modules' p, as the original forward reads
        p = layer.attn.resid_dropout.p if layer.training else 0.0
        spec = BlockSpec(layer.attn.num_heads, True, layer.ln_1.eps, mlp=GELU_FORMS[cfg.activation_function],
                         lora=specs)  # fmt: skip
        return BlockConfig(spec, layer._ckpt_policy, call_seed(p, p_attn, specs), p_attn, p)

    def fused_args(self, layer, parts, bound: dict, lin: Linears):
        """False to run the original forward, else (the additive attention mask or None,)."""
        x = bound["hidden_states"]
        if attentions_requested(bound):
            return False
        if bound.get("head_mask") is not None or bound.get("encoder_hidden_states") is not None:
            return False
        mask = bound.get("attention_mask")
        impl = getattr(layer.attn.config, "_attn_implementation", "eager")
        if not layer_fusable(layer, impl, mask, lin, (layer.attn.resid_dropout.p, layer.mlp.dropout.p)):
            return False
        cache = first_given(bound, _CACHE_ARGS)
        if cache is not None:
            if not layer.training or _cached_tokens(cache, layer.attn.layer_idx) > 0:
                return False  # eval (e.g. a prefix for generation with grad on) or a filled cache: it must be filled
            warn_once("gpt2-cache", "ckpt_ext: fused GPT-2 blocks do not fill the KV cache while training (as with "
                      "Hugging Face's gradient checkpointing); pass use_cache=False to silence this")  # fmt: skip
        if mask is None:
            return (None,)
        info = layer_mask(mask, x.shape[1], True, layer, x.shape[0])
        return (info.additive(mask),) if eager_rows_ok(layer, impl, info, mask) else False


def _cached_tokens(cache, layer_idx) -> int:
    if isinstance(cache, tuple):
        return int(cache[0].shape[-2]) if len(cache) and isinstance(cache[0], Tensor) else 0
    inner = getattr(cache, "self_attention_cache", cache)
    try:
        return int(inner.get_seq_length(layer_idx or 0))
    except (TypeError, IndexError, AttributeError):
        return int(inner.get_seq_length())
