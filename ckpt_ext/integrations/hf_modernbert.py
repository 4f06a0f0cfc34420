"""Hugging Face ModernBERT adapter (``ModernBertEncoderLayer``; ModernBert{Model, ForMaskedLM,
ForSequenceClassification, ...}): transformers 4.57 and 5.x.

layer(x) = x1 + Wo(act(input) * gate), input | gate = Wi(mlp_norm(x1)) (halves of one packed Wi),
       x1 = x + attn.Wo(attention(rope(q), rope(k), v)), q|k|v = Wqkv(attn_norm(x))
pre-LN LayerNorm (eps norm_eps, bias per norm_bias; layer 0 has no attention norm: BlockSpec.attn_norm=False),
bidirectional attention, RoPE from the layer's own rotary_emb (θ global_rope_theta on global layers,
local_rope_theta on local ones), every global_attn_every_n_layers-th layer global and the others a sliding window
|i - j| <= local_attention // 2 (BlockSpec.window: the kernels apply it per tile, no (T, T) mask), biases per
attention_bias / mlp_bias. The GeGLU block's activated half is w_gate = Wi.weight[:F] and w_up = Wi.weight[F:]
(views: Wi.weight gets the gradient); hidden_activation gelu (erf: MLP form geglu_erf, the default) or
gelu_pytorch_tanh / gelu_new (geglu). PEFT LoRA on Wqkv, attn.Wo, mlp.Wo and Wi: Wi's adapter becomes the gate and up
adapters, sharing A (its gradient sums both) with B split by rows, exactly PEFT's update on the packed output.

Masks (4.57): every layer receives the model's two (B, 1, T, T) additive masks (global and windowed). The fused path
reads the key-padding mask from the global one (hf_masks.LayerMask.key_ids: its rows must be equal, no bias) and
checks once per forward that the windowed one is exactly that key mask within the band. 5.x passes each layer the
mask of its type (create_bidirectional_mask / create_bidirectional_sliding_window_mask: None, or 4-D bool / additive)
and the (cos, sin) of its type: a global layer's mask must be a key mask; a sliding layer's is read as
keep[b, j] = mask[b, 0, j, j] and checked to be exactly keep ∧ |i - j| <= config.sliding_window (once per mask
tensor); None means Hugging Face attends to every key (window 0 then, as its sdpa call does). The kernels get (B, T)
int32 key ids (1 kept, -1 padded: padded query rows keep computing, as in Hugging Face) plus the window, and skip
key tiles outside both; nothing T×T reaches them. A query row left without any visible key (a batch row of only
padding; on local layers a padded row farther than the window from every real token) gets uniform weights in Hugging
Face's softmax and zeros from the kernels, so such a forward runs the original (warned once). Under torch.compile
these mask checks are device assertions (an error naming the case, no graph break; on CUDA a device-side assert:
see hf_masks).

Original forward (warned once): flash_attention_2 (unpadded cu_seqlens path), output_attentions, hooks or unsupported
submodules, LoRA under torch.compile or with lora_dropout on Wi, attention_dropout or mlp_dropout > 0 while training
(the MLP's dropout sits inside the gated product), another hidden_activation, masks that are not of the shape above, no
position_ids.
"""

from __future__ import annotations

import torch

from ..lora import Linears, LoraSpec
from ..spec import BlockConfig, BlockSpec
from .hf_adapter import FUSED_ATTENTION, LayerAdapter, attentions_requested, call_seed, classes_of
from .hf_common import common_fallback, fallback, lora_eager_only
from .hf_masks import KEY_MASK_CHECKS, holds, layer_mask, visible

GEGLU_FORMS = {"gelu": "geglu_erf", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}  # hidden_activation -> form


class _Call:
    """Per call: the window the layer's mask asks for (5.x: 0 when the model passed no mask)."""

    def __init__(self, layer):
        local = getattr(layer.attn, "local_attention", (-1, -1))  # 4.57; 5.x: set by fused_args from the mask
        self.window = local[0] if local != (-1, -1) else 0


class ModernBertAdapter(LayerAdapter):
    name = "ModernBERT (ModernBertModel, ModernBertForMaskedLM, ModernBertForSequenceClassification, ...)"

    def layer_classes(self) -> tuple[type, ...]:
        return classes_of((("modernbert", "ModernBertEncoderLayer"),))

    def check(self, layer) -> None:
        """Raise ValueError naming every config field the fused block does not compute."""
        cfg, attn = layer.config, layer.attn
        problems = []
        if not isinstance(layer.mlp_norm, torch.nn.LayerNorm) or layer.mlp_norm.eps != cfg.norm_eps:
            problems.append("mlp_norm is not LayerNorm(norm_eps)")
        if attn.head_dim % 2:
            problems.append(f"head_dim={attn.head_dim} is odd (RoPE needs an even head_dim)")
        if problems:
            raise ValueError(f"{type(layer).__name__} cannot be fused: " + "; ".join(problems))

    def read(self, layer) -> _Call:
        return _Call(layer)

    def linears(self, layer, parts=None) -> dict:
        return {"qkv": ("attn.Wqkv", layer.attn.Wqkv), "proj": ("attn.Wo", layer.attn.Wo),
                "fc": ("mlp.Wi", layer.mlp.Wi), "fc2": ("mlp.Wo", layer.mlp.Wo)}  # fmt: skip

    def norms(self, layer, parts) -> dict:
        p = dict(ln2_w=layer.mlp_norm.weight, ln2_b=layer.mlp_norm.bias)
        if isinstance(layer.attn_norm, torch.nn.LayerNorm):
            p.update(ln1_w=layer.attn_norm.weight, ln1_b=layer.attn_norm.bias)
        return p

    def params(self, layer, parts, lin: Linears) -> dict:
        """The skeleton's params with the packed Wi as GeGLU's gate (its first, activated half) and up (views); a
        LoRA on Wi likewise: A shared by both halves (its gradient is the sum of theirs), B split by rows."""
        p = super().params(layer, parts, lin)
        wi, bi = p.pop("w_fc"), p.pop("b_fc")
        f = layer.mlp.Wo.in_features
        p.update(w_gate=wi[:f], w_up=wi[f:], b_gate=None if bi is None else bi[:f], b_up=None if bi is None else bi[f:])
        if "lora_a_fc" in p:
            a, b = p.pop("lora_a_fc"), p.pop("lora_b_fc")
            p.update(lora_a_gate=a, lora_b_gate=b[:f], lora_a_up=a, lora_b_up=b[f:])
        return p

    def block_config(self, layer, parts, specs: tuple = ()) -> BlockConfig:
        cfg = layer.config
        specs = tuple(x for s in specs for x in (_split_wi(s) if s.target == "fc" else (s,)))
        spec = BlockSpec(cfg.num_attention_heads, False, cfg.norm_eps, norm="layernorm", norm_bias=cfg.norm_bias,
                         attn_norm=isinstance(layer.attn_norm, torch.nn.LayerNorm),
                         mlp=GEGLU_FORMS[cfg.hidden_activation], packed_qkv=True, window=parts.window,
                         lora=specs)  # fmt: skip
        return BlockConfig(spec, layer._ckpt_policy, call_seed(0.0, 0.0, specs), 0.0, 0.0)

    def fused_args(self, layer, parts: _Call, bound: dict, lin: Linears):
        """False to run the original forward, else (None, (cos, sin), (B, T) int32 key ids or None)."""
        if "position_embeddings" in bound:  # transformers 5.x
            return self._args_5x(layer, parts, bound, lin)
        return self._args_457(layer, parts, bound, lin)

    def _common(self, layer, bound: dict, lin: Linears, mask) -> bool:
        """False (warned once) for what neither version fuses."""
        cfg = layer.config
        if attentions_requested(bound):
            return fallback(layer, "output-attentions", "output_attentions=True (the fused block keeps no weights)")
        if bound.get("cu_seqlens") is not None or bound.get("max_seqlen") is not None:
            return fallback(layer, "unpadded", "the unpadded (cu_seqlens) flash_attention_2 path")
        if not common_fallback(layer, cfg._attn_implementation, FUSED_ATTENTION, mask, lin):
            return False
        if not lora_eager_only(layer, lin):
            return False
        if any(spec.target == "fc" and spec.dropout > 0.0 for spec in lin.specs):
            return fallback(layer, "lora-wi-dropout", "lora_dropout on mlp.Wi while training (PEFT drops Wi's input "
                            "once for both GeGLU halves; the fused halves would draw a mask each)")  # fmt: skip
        if cfg.hidden_activation not in GEGLU_FORMS:
            return fallback(layer, "activation", f"hidden_activation={cfg.hidden_activation!r} (the fused GeGLU "
                            f"takes {', '.join(GEGLU_FORMS)})")  # fmt: skip
        if layer.training and (cfg.attention_dropout > 0.0 or cfg.mlp_dropout > 0.0):
            return fallback(layer, "dropout", f"attention_dropout={cfg.attention_dropout}, mlp_dropout="
                            f"{cfg.mlp_dropout} while training (fused: both 0, or eval)")  # fmt: skip
        return True

    def _args_457(self, layer, parts: _Call, bound: dict, lin: Linears):
        x = bound["hidden_states"]
        b, t = x.shape[:2]
        mask, window_mask = bound.get("attention_mask"), bound.get("sliding_window_mask")
        if not self._common(layer, bound, lin, mask):
            return False
        if bound.get("position_ids") is None:
            return fallback(layer, "position-ids", "no position_ids (RoPE needs them)")
        if not (_is_4d(mask, x) and _is_4d(window_mask, x)):
            return fallback(layer, "mask-shape", "attention masks other than the model's two (B, 1, T, T) masks")
        entry = layer_mask(mask, t, False, layer, b)
        key = entry.key_ids(mask)
        if key.failed is not None:
            return fallback(layer, key.failed, KEY_MASK_CHECKS[key.failed])
        keep = _keep_of(key.ids, x)
        half = layer.config.local_attention // 2  # keep is fixed within the forward: the band check is per half
        band = _WINDOW_MASK.format(w="local_attention // 2")
        window_entry = layer_mask(window_mask, t, False, layer, b)
        if not window_entry.memo(("band", half), lambda: holds(_window_mask_ok(window_mask, keep, half), band)):
            return fallback(layer, "window-mask", band)
        if not entry.memo(("rows", parts.window), lambda: holds(_no_empty_rows(keep, parts.window), _EMPTY_ROWS)):
            return fallback(layer, "empty-rows", _EMPTY_ROWS)
        cos, sin = layer.attn.rotary_emb(x, position_ids=bound["position_ids"])  # (B|1, T, dh) each
        return None, (cos, sin), key.ids

    def _args_5x(self, layer, parts: _Call, bound: dict, lin: Linears):
        x = bound["hidden_states"]
        mask = bound.get("attention_mask")
        if not self._common(layer, bound, lin, mask):
            return False
        rope = bound.get("position_embeddings")
        if rope is None:
            return fallback(layer, "position-embeddings", "no position_embeddings (RoPE needs them)")
        parts.window = 0
        if mask is None:  # Hugging Face attends to every key
            return None, tuple(rope), None
        if not _is_4d(mask, x):
            shape = tuple(mask.shape)
            return fallback(layer, "mask-shape", f"an attention mask of shape {shape} (fused: (B, 1, T, T))")
        b, t = x.shape[:2]
        entry = layer_mask(mask, t, False, layer, b)
        if getattr(layer, "attention_type", "full_attention") != "sliding_attention":
            key = entry.key_ids(mask)
            if key.failed is not None:
                return fallback(layer, key.failed, KEY_MASK_CHECKS[key.failed])
            ids, keep = key.ids, _keep_of(key.ids, x)
        else:
            parts.window = layer.config.sliding_window
            keep = visible(mask.diagonal(dim1=2, dim2=3)[:, 0]).expand(b, t)  # (B, T): key j as row j sees it
            band = _WINDOW_MASK.format(w="config.sliding_window")
            if not entry.memo(("band", parts.window), lambda: holds(_window_mask_ok(mask, keep, parts.window), band)):
                return fallback(layer, "window-mask", band)
            ids = torch.where(keep, 1, -1).to(torch.int32)  # segments.from_key_mask's 1 / -1
        if not entry.memo(("rows", parts.window), lambda: holds(_no_empty_rows(keep, parts.window), _EMPTY_ROWS)):
            return fallback(layer, "empty-rows", _EMPTY_ROWS)
        return None, tuple(rope), ids


_WINDOW_MASK = "a sliding-window mask that is not a key mask within |i - j| <= {w} (or carries a bias)"
_EMPTY_ROWS = ("a padding mask that leaves query rows no key within their window (Hugging Face's softmax gives them "
               "uniform weights, the fused kernels zeros)")  # fmt: skip


def _split_wi(spec: LoraSpec) -> tuple[LoraSpec, LoraSpec]:
    """A LoRA on the packed Wi as the GeGLU block's gate and up adapters (same rank and scaling; no dropout)."""
    return LoraSpec("gate", spec.rank, spec.scaling), LoraSpec("up", spec.rank, spec.scaling)


def _keep_of(ids, x):
    """(B, T) bool: the keys key ids keep (all, for None)."""
    if ids is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return ids > 0


def _is_4d(mask, x) -> bool:
    b, t = x.shape[:2]
    return isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2:] == (t, t) \
        and mask.shape[0] in (1, b)  # fmt: skip


def _window_mask_ok(window_mask, keep, w: int):
    """0-dim bool: whether sliding_window_mask is exactly keep[b, j] ∧ |i - j| <= w, with no bias (a float mask is 0
    wherever it keeps a key)."""
    with torch.no_grad():
        t = keep.shape[1]
        pos = torch.arange(t, device=keep.device)
        band = (pos[:, None] - pos[None, :]).abs() <= w  # (T, T), transient
        expected = keep[:, None, None, :] & band  # (B, 1, T, T)
        ok = (visible(window_mask) == expected).all()
        if window_mask.dtype != torch.bool:  # no bias where it keeps a key: 0 there
            ok = ok & (window_mask.masked_fill(~expected, 0) == 0).all()
    return ok


def _no_empty_rows(keep, window: int):
    """0-dim bool: whether every query row sees a kept key (within |i - j| <= window when window > 0): O(B·T)."""
    with torch.no_grad():
        if window == 0:
            return keep.any(dim=1).all()
        t = keep.shape[1]
        cs = torch.nn.functional.pad(keep.int().cumsum(dim=1), (1, 0))  # (B, T + 1)
        pos = torch.arange(t, device=keep.device)
        seen = cs[:, (pos + window + 1).clamp_max(t)] - cs[:, (pos - window).clamp_min(0)]
        return (seen > 0).all()
