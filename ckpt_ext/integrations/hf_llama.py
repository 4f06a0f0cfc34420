"""Hugging Face Llama-family adapter (``LlamaDecoderLayer``, ``MistralDecoderLayer``, ``Qwen2DecoderLayer``,
``Qwen3DecoderLayer``): transformers 4.57 and 5.x.

layer(x) = x1 + down_proj(silu(gate_proj(n2)) * up_proj(n2)), n2 = post_attention_layernorm(x1),
       x1 = x + o_proj(attention(rope(q), rope(k), v)), q|k|v = {q,k,v}_proj(input_layernorm(x))
with RMSNorm in Hugging Face's cast order, GQA (``num_key_value_heads``), RoPE applied with the model's own
``position_embeddings = (cos, sin)`` (so every rope scaling the config names works), Qwen2's q/k/v biases, Llama's
``attention_bias`` / ``mlp_bias``, Qwen3's per-head ``q_norm`` / ``k_norm`` before RoPE, scale ``head_dim ** -0.5``.
The block gets Hugging Face's own weight tensors (separate q/k/v and gate/up: no concatenation is built or kept).

Fused path: autograd records the call, ``position_embeddings`` are given, no attention weights requested, attention
implementation eager or sdpa, only plain submodules without hooks (hf_common.unsupported_submodule), eager
attention only with a mask that leaves every query row a key, and no KV cache to serve: a cache holding tokens,
or any cache outside training, runs the original forward (so generate() and eval with use_cache fill it); while
training a cache created by default is left unfilled, as Hugging Face's own gradient checkpointing does. Masks: None
(causal), 4-D bool or additive (padding, packed sequences' block-diagonal masks, sliding windows as the model built
them), or a 2-D padding mask; a mask that masks nothing beyond causality reaches the unmasked causal kernel. A
sliding window shorter than the sequence with no 4-D mask that encodes it runs the original forward (warned once).
A 4-D mask that is exactly causal ∧ key-keep ∧ same-segment (left padding, packed sequences from position_ids) is
handed over as (B, T) segment ids instead (hf_masks.py: checked against the mask, converted once per forward).
Returns what the original returns: the hidden states tensor (4.57, 5.x), a 1-tuple where the layer's signature says so.
"""

from __future__ import annotations

from ..spec import BlockConfig, BlockSpec
from .hf_adapter import LayerAdapter, call_seed, classes_of, first_given, layer_fusable
from .hf_common import Linears, eager_rows_ok, fallback, warn_once
from .hf_gpt2 import _cached_tokens
from .hf_masks import layer_mask

_CACHE_ARGS = ("cache", "past_key_values", "past_key_value")  # 5.x names it cache


class LlamaFamilyAdapter(LayerAdapter):
    name = "Llama, Mistral, Qwen2, Qwen3 (*Model, *ForCausalLM, *ForSequenceClassification, ...)"

    def layer_classes(self) -> tuple[type, ...]:
        return classes_of((("llama", "LlamaDecoderLayer"), ("mistral", "MistralDecoderLayer"),
                           ("qwen2", "Qwen2DecoderLayer"), ("qwen3", "Qwen3DecoderLayer")))  # fmt: skip

    def check(self, layer) -> None:
        """Raise ValueError naming every config field the fused block does not compute."""
        attn, mlp, cfg = layer.self_attn, layer.mlp, layer.self_attn.config
        problems = []
        act = getattr(cfg, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            problems.append(f"hidden_act={act!r} (the fused MLP is SwiGLU: silu)")
        if layer.input_layernorm.variance_epsilon != layer.post_attention_layernorm.variance_epsilon:
            problems.append("input_layernorm and post_attention_layernorm with different eps")
        if abs(attn.scaling - attn.head_dim**-0.5) > 1e-12:
            problems.append(f"attention scaling {attn.scaling} != head_dim ** -0.5")
        if attn.head_dim % 2:
            problems.append(f"head_dim={attn.head_dim} is odd (RoPE needs an even head_dim)")
        if (mlp.gate_proj.bias is None) != (mlp.up_proj.bias is None):
            problems.append("gate_proj and up_proj disagree on bias")
        if hasattr(attn, "q_norm") != hasattr(attn, "k_norm"):
            problems.append("q_norm without k_norm")
        elif hasattr(attn, "q_norm") and attn.q_norm.variance_epsilon != layer.input_layernorm.variance_epsilon:
            problems.append("q_norm/k_norm eps differs from rms_norm_eps")
        if problems:
            raise ValueError(f"{type(layer).__name__} cannot be fused: " + "; ".join(problems))

    def linears(self, layer, parts=None) -> dict:
        """LoRA target -> (path in the layer, module) of each linear (a PEFT LoRA layer where one is injected)."""
        a, m = layer.self_attn, layer.mlp
        return {"q": ("self_attn.q_proj", a.q_proj), "k": ("self_attn.k_proj", a.k_proj),
                "v": ("self_attn.v_proj", a.v_proj), "proj": ("self_attn.o_proj", a.o_proj),
                "gate": ("mlp.gate_proj", m.gate_proj), "up": ("mlp.up_proj", m.up_proj),
                "fc2": ("mlp.down_proj", m.down_proj)}  # fmt: skip

    def norms(self, layer, parts) -> dict:
        a = layer.self_attn
        p = dict(ln1_w=layer.input_layernorm.weight, ln2_w=layer.post_attention_layernorm.weight)
        if hasattr(a, "q_norm"):
            p.update(q_norm_w=a.q_norm.weight, k_norm_w=a.k_norm.weight)
        return p

    def block_config(self, layer, parts=None, specs: tuple = ()) -> BlockConfig:
        a = layer.self_attn
        p_attn = a.attention_dropout if layer.training else 0.0
        seed = call_seed(0.0, p_attn, specs)
        n_heads = a.config.num_attention_heads
        spec = BlockSpec(n_heads, True, layer.input_layernorm.variance_epsilon, norm="rmsnorm", mlp="swiglu",
                         n_kv_heads=a.config.num_key_value_heads, head_dim=a.head_dim, qk_norm=hasattr(a, "q_norm"),
                         packed_qkv=False, lora=specs)  # fmt: skip
        return BlockConfig(spec, layer._ckpt_policy, seed, p_attn, 0.0)

    def fused_args(self, layer, parts, bound: dict, lin: Linears):
        """False to run the original forward (warned once where it is not an inference or attention-output call),
        else (attn_mask, (cos, sin), segment_ids): padding and packing as (B, T) ids where the mask allows, so no 4-D
        mask reaches the kernels."""
        x = bound["hidden_states"]
        mask = bound.get("attention_mask")
        extra = bound["kwargs"]
        if extra.get("output_attentions") or bound.get("position_embeddings") is None:
            return False
        impl = getattr(layer.self_attn.config, "_attn_implementation", "eager")
        if not layer_fusable(layer, impl, mask, lin):
            return False
        window = _sliding_window(layer)
        if window is not None and window < x.shape[1] and not (mask is not None and mask.dim() == 4):
            return fallback(layer, "window", f"a sliding window ({window}) shorter than the sequence without a 4-D "
                            "mask that encodes it")  # fmt: skip
        cache = first_given(bound, _CACHE_ARGS)
        if cache is not None:
            if not layer.training or _cached_tokens(cache, layer.self_attn.layer_idx) > 0:
                return False  # serve the cache: the original forward fills it
            warn_once("llama-cache", "ckpt_ext: fused Llama-family layers do not fill the KV cache while training (as "
                      "with Hugging Face's gradient checkpointing); pass use_cache=False to silence this")  # fmt: skip
        pe = tuple(bound["position_embeddings"])
        if mask is None:
            return None, pe, None
        info = layer_mask(mask, x.shape[1], True, layer, x.shape[0], bound.get("position_ids"))
        if not eager_rows_ok(layer, impl, info, mask):
            return False
        ids = info.segment_ids(mask)
        return (None, pe, ids) if ids is not None else (info.additive(mask), pe, None)


def _sliding_window(layer):
    """The layer's attention window: Qwen2/3 set it per layer (self_attn.sliding_window), Mistral in its config."""
    attn = layer.self_attn
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)
