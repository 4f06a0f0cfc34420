"""``TransformerBlock`` (plain pre-norm block, torch modules) and ``FusedCheckpointBlock`` (same parameters, fused
checkpointing through the ``ckpt_ext::*`` op graph), for GPT-2/ViT-style and Llama-family blocks.

GPT-2 form (norm="layernorm", activation "gelu" | "gelu_tanh"), x (B, T, d):
    q|k|v = attn.qkv(ln_1(x)), heads contiguous;  x1 = x + Dropout(attn.proj(SDPA(q, k, v)))
    out = x1 + Dropout(mlp.proj(gelu(mlp.fc(ln_2(x1)))))
Llama form (norm="rmsnorm", activation="swiglu"): RMSNorm with Hugging Face's cast order, separate attn.q / attn.k /
attn.v (n_kv_heads kv heads, GQA without repeated k/v), optional per-head attn.q_norm / attn.k_norm (Qwen3), RoPE from
``position_embeddings=(cos, sin)`` (the model's, any scaling) with the rotate-half convention, and
    out = x1 + Dropout(mlp.proj(silu(mlp.gate(n2)) * mlp.up(n2))).
hidden = d_ff, or int(mlp_ratio * d_model). Parameter names are the same in both classes, so state_dicts load both
ways and ``FusedCheckpointBlock.from_block`` shares a block's parameters without copying them.
``forward(x, attn_mask=None, position_embeddings=None, segment_ids=None)`` in both: segment_ids (B, T) int32/int64
(ckpt_ext/segments.py; 0 = padding, equal ids = one packed sequence, -s = a padded key whose row still sees sequence s,
as an encoder's key mask) hide every key outside the row's segment, on top of attn_mask. The fused block hands them to
the attention ops as they are (no (B, 1, T, T) mask is built); the plain block turns them into the equivalent bool mask
for SDPA.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import lora, reference, seeds, segments
from .block_parts.norm import invertible
from .compiled import compiled_block
from .functional import (
    ALL_PARAM_NAMES,
    BlockConfig,
    BlockSpec,
    EagerFastPath,
    FusedBlockFunction,
    block_forward,
    check_config,
    is_numpy_bool,
    param_names,
)
from .policies import get_policy
from .spec import GATE_ACTIVATIONS, GELU_FORM, MLPS, NORMS, PLACEMENTS

ACTIVATIONS = MLPS  # the MLP forms (spec.py): "gelu", "gelu_tanh", "swiglu", "geglu"
_GATE_FNS = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "gelu": F.gelu}


class RMSNorm(nn.Module):
    """Hugging Face's RMSNorm: weight * (x_f32 * rsqrt(mean(x_f32²) + eps)).to(x.dtype)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, bias: bool, *, packed: bool = True, n_kv_heads: int = 0,
                 head_dim: int = 0, qkv_bias: Optional[bool] = None, qk_norm: bool = False,
                 eps: float = 1e-6, dropout: float = 0.0):  # fmt: skip
        super().__init__()
        kv, dh = n_kv_heads or n_heads, head_dim or d_model // n_heads
        qkv_bias = bias if qkv_bias is None else qkv_bias
        if packed:
            self.qkv = nn.Linear(d_model, (n_heads + 2 * kv) * dh, bias=qkv_bias)
        else:
            self.q = nn.Linear(d_model, n_heads * dh, bias=qkv_bias)
            self.k = nn.Linear(d_model, kv * dh, bias=qkv_bias)
            self.v = nn.Linear(d_model, kv * dh, bias=qkv_bias)
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(dh, eps), RMSNorm(dh, eps)
        self.proj = nn.Linear(n_heads * dh, d_model, bias=bias)
        self.attn_drop = nn.Dropout(dropout)  # its p is the attention dropout of both blocks (no state: no state_dict)


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool, gated: bool = False):
        super().__init__()
        if gated:
            self.gate = nn.Linear(d_model, hidden, bias=bias)
            self.up = nn.Linear(d_model, hidden, bias=bias)
        else:
            self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)


def _positive_int(name: str, value, allow_none: bool = False) -> Optional[int]:
    """value as a Python int (numpy integers included), checked positive."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def _checked_p(name: str, p) -> float:
    p = _real(name, p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def _real(name: str, value) -> float:
    """value as a Python float (numpy scalars included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _flag(name: str, value, allow_none: bool = False) -> Optional[bool]:
    """value as a Python bool (numpy bools included)."""
    if allow_none and value is None:
        return None
    if not isinstance(value, bool) and not is_numpy_bool(value):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _dropout_p(where: str, module: nn.Dropout) -> float:
    """The probability ``module`` applies now (0 in eval mode), checked for the fused kernels."""
    if not module.training:
        return 0.0
    p = module.p
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{where}.p must be in [0, 1) for the fused block, got {p!r}")
    return float(p)


def rotate_half_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Hugging Face's apply_rotary_pos_emb on (B, heads, T, dh) q, k with cos/sin (B|1, T, dh)."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + reference.rotate_half(q) * s, k * c + reference.rotate_half(k) * s


class TransformerBlock(nn.Module):
    """Plain pre-norm transformer block (no checkpointing): the baseline FusedCheckpointBlock reproduces."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        activation: str = "gelu",
        norm_placement: str = "pre",
        packed_qkv: Optional[bool] = None,
        causal: bool = True,
        eps: Optional[float] = None,
        bias: Optional[bool] = None,
        norm: Optional[str] = None,
        n_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        d_ff: Optional[int] = None,
        qkv_bias: Optional[bool] = None,
        qk_norm: bool = False,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        norm = ("rmsnorm" if activation == "swiglu" else "layernorm") if norm is None else norm
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        if norm_placement not in PLACEMENTS:
            raise ValueError(f"norm_placement must be one of {PLACEMENTS}, got {norm_placement!r}")
        # hyperparameters become Python numbers (numpy scalars included): configs round-trip through repr() (compile)
        d_model, n_heads = _positive_int("d_model", d_model), _positive_int("n_heads", n_heads)
        n_kv_heads = _positive_int("n_kv_heads", n_kv_heads, allow_none=True)
        head_dim = _positive_int("head_dim", head_dim, allow_none=True)
        d_ff = _positive_int("d_ff", d_ff, allow_none=True)
        eps = None if eps is None else _real("eps", eps)
        causal, qk_norm = _flag("causal", causal), _flag("qk_norm", qk_norm)
        bias, qkv_bias = _flag("bias", bias, allow_none=True), _flag("qkv_bias", qkv_bias, allow_none=True)
        if head_dim is None and d_model % n_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model}) unless head_dim is given")
        kv = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads % kv != 0:
            raise ValueError(f"n_kv_heads ({kv}) must divide n_heads ({n_heads})")
        dh = d_model // n_heads if head_dim is None else head_dim
        if qk_norm and norm_placement == "post":
            raise ValueError("qk_norm=True needs norm_placement='pre'")
        packed_qkv = _flag("packed_qkv", packed_qkv, allow_none=True)
        if d_ff is None:
            if not isinstance(mlp_ratio, numbers.Real) or isinstance(mlp_ratio, bool) or not mlp_ratio > 0:
                raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
            d_ff = int(float(mlp_ratio) * d_model)
            if d_ff <= 0:
                raise ValueError(f"mlp_ratio={mlp_ratio} gives an MLP hidden size of 0 at d_model={d_model}")
        dropout, attn_dropout = _checked_p("dropout", dropout), _checked_p("attn_dropout", attn_dropout)
        llama = norm == "rmsnorm"
        eps = (1e-6 if llama else 1e-5) if eps is None else eps
        bias = (not llama) if bias is None else bias
        self.d_model, self.n_heads, self.hidden = d_model, n_heads, d_ff
        self.n_kv_heads, self.head_dim, self.qkv_bias, self.qk_norm = kv, dh, qkv_bias, qk_norm
        self.mlp_ratio = d_ff / d_model
        self.activation, self.causal, self.eps, self.bias, self.norm = activation, causal, eps, bias, norm
        self.norm_placement, self.packed_qkv = norm_placement, (not llama) if packed_qkv is None else packed_qkv
        self.ln_1 = RMSNorm(d_model, eps) if llama else nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.attn = Attention(d_model, n_heads, bias, packed=self.packed_qkv, n_kv_heads=kv, head_dim=dh,
                              qkv_bias=qkv_bias, qk_norm=qk_norm, eps=eps, dropout=attn_dropout)  # fmt: skip
        self.ln_2 = RMSNorm(d_model, eps) if llama else nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.mlp = MLP(d_model, d_ff, bias, gated=activation in GATE_ACTIVATIONS)
        self.resid_drop = nn.Dropout(dropout)

    # The dropout probabilities live in the nn.Dropout modules (one source of truth for both blocks and for
    # from_block's shared modules): a schedule that sets p on every nn.Dropout reaches the fused block too.
    @property
    def dropout(self) -> float:
        return self.resid_drop.p

    @dropout.setter
    def dropout(self, p) -> None:
        self.resid_drop.p = _checked_p("dropout", p)

    @property
    def attn_dropout(self) -> float:
        return self.attn.attn_drop.p

    @attn_dropout.setter
    def attn_dropout(self, p) -> None:
        self.attn.attn_drop.p = _checked_p("attn_dropout", p)

    def config(self) -> dict:
        return dict(
            d_model=self.d_model, n_heads=self.n_heads, d_ff=self.hidden, dropout=self.dropout,
            attn_dropout=self.attn_dropout, activation=self.activation, causal=self.causal, eps=self.eps,
            bias=self.bias, norm=self.norm, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
            qkv_bias=self.qkv_bias, qk_norm=self.qk_norm, norm_placement=self.norm_placement,
            packed_qkv=self.packed_qkv,
        )  # fmt: skip

    def spec(self, lora_specs: tuple = ()) -> BlockSpec:
        """This block's form as a BlockSpec (what the fused ops run)."""
        return BlockSpec(self.n_heads, self.causal, self.eps, norm=self.norm, norm_bias=True,
                         placement=self.norm_placement, mlp=self.activation, n_kv_heads=self.n_kv_heads,
                         head_dim=self.head_dim, qk_norm=self.qk_norm, packed_qkv=self.packed_qkv,
                         lora=lora_specs)  # fmt: skip

    def _check_input(self, x: Tensor, attn_mask: Optional[Tensor], position_embeddings, segment_ids=None) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected x of shape (batch, seq, {self.d_model}), got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point x, got {x.dtype}")
        b, t, _ = x.shape
        if attn_mask is not None:
            check_attn_mask(attn_mask, b, self.n_heads, t)
        if position_embeddings is not None:
            check_position_embeddings(position_embeddings, b, t, self.head_dim)
        if segment_ids is not None:
            check_segment_ids(segment_ids, x)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, position_embeddings=None,
                segment_ids: Optional[Tensor] = None) -> Tensor:  # fmt: skip
        self._check_input(x, attn_mask, position_embeddings, segment_ids)
        attn_mask = segments.with_mask(attn_mask, segment_ids)
        b, t, _ = x.shape
        dh, h, kv = self.head_dim, self.n_heads, self.n_kv_heads
        post = self.norm_placement == "post"
        n1 = x if post else self.ln_1(x)
        if not self.packed_qkv:
            q, k, v = self.attn.q(n1), self.attn.k(n1), self.attn.v(n1)
        else:
            q, k, v = self.attn.qkv(n1).split([h * dh, kv * dh, kv * dh], dim=-1)
        q, k, v = q.view(b, t, h, dh), k.view(b, t, kv, dh), v.view(b, t, kv, dh)
        if self.qk_norm:
            q, k = self.attn.q_norm(q), self.attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if position_embeddings is not None:
            q, k = rotate_half_rope(q, k, *position_embeddings)
        if attn_mask is not None and self.causal:
            attn_mask = _with_causal(attn_mask, t)
        if q.dtype != v.dtype:  # HF's fp32 RoPE tables upcast q and k; SDPA wants one dtype
            q, k = q.to(v.dtype), k.to(v.dtype)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn.attn_drop.p if self.attn.attn_drop.training else 0.0,
            is_causal=self.causal and attn_mask is None, scale=dh**-0.5, enable_gqa=kv != h,
        )  # fmt: skip
        x1 = x + self.resid_drop(self.attn.proj(o.transpose(1, 2).reshape(b, t, h * dh)))
        x1 = self.ln_1(x1) if post else x1
        n2 = x1 if post else self.ln_2(x1)
        if self.activation in GATE_ACTIVATIONS:
            a = _GATE_FNS[GATE_ACTIVATIONS[self.activation]](self.mlp.gate(n2)) * self.mlp.up(n2)
        else:
            a = F.gelu(self.mlp.fc(n2), approximate=GELU_FORM[self.activation])
        out = x1 + self.resid_drop(self.mlp.proj(a))
        return self.ln_2(out) if post else out


# (ALL_PARAM_NAMES name, submodule path, attribute) of the parameters, per part of the block
_SHARED_SLOTS = (("ln1_w", ("ln_1",), "weight"), ("ln2_w", ("ln_2",), "weight"), ("w_proj", ("attn", "proj"), "weight"),
                 ("b_proj", ("attn", "proj"), "bias"), ("w_fc2", ("mlp", "proj"), "weight"),
                 ("b_fc2", ("mlp", "proj"), "bias"))  # fmt: skip
_NORM_BIAS_SLOTS = (("ln1_b", ("ln_1",), "bias"), ("ln2_b", ("ln_2",), "bias"))
_QK_NORM_SLOTS = (("q_norm_w", ("attn", "q_norm"), "weight"), ("k_norm_w", ("attn", "k_norm"), "weight"))
# (LoRA target = parameter suffix, submodule path) of the linears besides proj and fc2
_QKV_LINEARS = {True: (("qkv", ("attn", "qkv")),), False: tuple((s, ("attn", s)) for s in "qkv")}
_MLP_LINEARS = {False: (("fc", ("mlp", "fc")),), True: (("gate", ("mlp", "gate")), ("up", ("mlp", "up")))}


# (packed_qkv, gated) -> (LoRA target, submodule path) of every linear of the block (tables, not caches: dynamo
# traces plain dict lookups)
_LINEARS = {(packed, gated): (*_QKV_LINEARS[packed], ("proj", ("attn", "proj")), *_MLP_LINEARS[gated],
                              ("fc2", ("mlp", "proj")))
            for packed in (True, False) for gated in (True, False)}  # fmt: skip


def _slot_table(norm: str, packed_qkv: bool, gated: bool, qk_norm: bool) -> tuple:
    linears = (*_QKV_LINEARS[packed_qkv], *_MLP_LINEARS[gated])
    return (*_SHARED_SLOTS, *(_NORM_BIAS_SLOTS if norm == "layernorm" else ()), *(_QK_NORM_SLOTS if qk_norm else ()),
            *((f"{kind}_{target}", path, attr) for target, path in linears
              for kind, attr in (("w", "weight"), ("b", "bias"))))  # fmt: skip


# (norm, packed_qkv, gated, qk_norm) -> (parameter name, submodule path, attribute) of every parameter
_SLOTS = {key: _slot_table(*key) for key in itertools.product(NORMS, (True, False), (True, False), (True, False))}


_WARNED: set = set()


def _param(module: nn.Module, name: str) -> Optional[Tensor]:
    """module.<name>: a registered parameter (None included) straight from ``_parameters``, else getattr."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name, None)


def check_attn_mask(attn_mask, batch: int, n_heads: int, seq: int) -> None:
    """attn_mask must be a bool keep-mask or a float additive mask broadcastable to (B, heads, T, T)."""
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = attend) or floating point (additive), got {attn_mask.dtype}")
    target = (batch, n_heads, seq, seq)
    shape = tuple(attn_mask.shape)
    ok = len(shape) <= 4 and all(s == 1 or s == full for s, full in zip(shape[::-1], target[::-1]))  # SymInt-safe
    if not ok:
        raise ValueError(f"attn_mask of shape {shape} is not broadcastable to (batch, heads, T, T) = {target}")


def check_segment_ids(segment_ids, x: Tensor) -> None:
    """segment_ids must be an int32/int64 (B, T) tensor on x's device."""
    if not isinstance(segment_ids, Tensor):
        raise TypeError(f"segment_ids must be a Tensor or None, got {type(segment_ids).__name__}")
    if segment_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"segment_ids must be int32 or int64 (0 = padding), got {segment_ids.dtype}")
    if tuple(segment_ids.shape) != tuple(x.shape[:2]):
        raise ValueError(f"segment_ids must be (batch, seq) = {tuple(x.shape[:2])}, got {tuple(segment_ids.shape)}")
    if segment_ids.device != x.device:
        raise ValueError(f"segment_ids is on {segment_ids.device}, x on {x.device}")


def check_position_embeddings(position_embeddings, batch: int, seq: int, head_dim: int) -> None:
    """position_embeddings must be (cos, sin), each (1 or B, T, head_dim)."""
    if not (isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2):
        raise TypeError("position_embeddings must be a (cos, sin) pair of tensors")
    for name, c in zip(("cos", "sin"), position_embeddings):
        ok = isinstance(c, Tensor) and c.dim() == 3 and c.shape[0] in (1, batch) and c.shape[1:] == (seq, head_dim)
        if not ok:
            shape = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(f"position_embeddings {name} must be (1 or {batch}, {seq}, {head_dim}) = (1|B, T, "
                             f"head_dim), got {shape}")  # fmt: skip
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")


def _with_causal(attn_mask: Tensor, t: int) -> Tensor:
    """Fold a causal mask into a user mask (bool keep-mask or additive float) for SDPA, which takes one or the other."""
    causal = torch.ones(t, t, dtype=torch.bool, device=attn_mask.device).tril()
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))


class FusedCheckpointBlock(TransformerBlock):
    """Drop-in TransformerBlock whose backward rebuilds what ``policy`` did not keep, inside fused kernels.

    policy: "none" | "pointwise" | "ffn" | "block_keep_attn" | "block" (see ckpt_ext.policies). Dropout masks come
    from per-call seeds drawn from torch's RNG, so recompute replays them exactly; all policies draw the same masks
    under one seed.
    """

    def __init__(self, d_model: int, n_heads: int, *, policy: str = "block", **kwargs):
        super().__init__(d_model, n_heads, **kwargs)
        self.policy = get_policy(policy).name

    @classmethod
    def from_block(cls, block: TransformerBlock, policy: str = "block") -> FusedCheckpointBlock:
        """A FusedCheckpointBlock that shares (does not copy) ``block``'s submodules and parameters."""
        if not isinstance(block, TransformerBlock):
            raise TypeError(f"from_block expects a ckpt_ext.TransformerBlock, got {type(block).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for key in ("d_model", "n_heads", "hidden", "mlp_ratio", "activation", "causal", "eps", "bias", "norm",
                    "n_kv_heads", "head_dim", "qkv_bias", "qk_norm", "norm_placement", "packed_qkv"):  # fmt: skip
            setattr(new, key, getattr(block, key))
        for name in ("ln_1", "attn", "ln_2", "mlp", "resid_drop"):
            setattr(new, name, getattr(block, name))
        new.policy = get_policy(policy).name
        new.train(block.training)
        return new

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}"

    def parameter_tensors(self) -> dict[str, Optional[Tensor]]:
        """The block's tensors by functional.ALL_PARAM_NAMES name (None where a bias is off), read through
        ``_parameters`` (nn.Module.__getattr__ costs ~1 µs a lookup, ~25 of them a step)."""
        p = {}
        for name, path, attr in _SLOTS[self.norm, self.packed_qkv, self.activation in GATE_ACTIVATIONS, self.qk_norm]:
            module = self
            for part in path:
                module = module._modules[part]
            p[name] = _param(module, attr)
        return p

    def read_lora(self, params: dict) -> tuple:
        """LoRA specs of PEFT LoRA layers on the block's linears (their A and B added to ``params``); raises
        lora.Unsupported for a linear the fused block would not compute exactly (another wrapper, a LoRA variant,
        hooks on a linear, whose effect the fused path would skip)."""
        linears = {}
        for target, path in _LINEARS[self.packed_qkv, self.activation in GATE_ACTIVATIONS]:
            module, name = self, ".".join(path)
            for part in path:
                module = module._modules[part]
            if module._forward_hooks or module._forward_pre_hooks:
                raise lora.Unsupported(f"{name} has forward hooks")
            if type(module) is not nn.Linear and not lora.is_lora_layer(module):
                raise lora.Unsupported(f"{name} is a {type(module).__name__}, not nn.Linear or PEFT LoRA")
            linears[target] = (name, module)
        lin = lora.read_linears(linears)
        wrapped = [t for t, base in lin.base.items() if type(base) is not nn.Linear]
        if wrapped:
            raise lora.Unsupported(f"{linears[wrapped[0]][0]} wraps a {type(lin.base[wrapped[0]]).__name__}, not "
                                   "nn.Linear")  # fmt: skip
        params.update(lin.lora_params)
        return lin.specs

    def block_config(self, lora_specs: tuple = ()) -> BlockConfig:
        """This call's configuration; the dropout probabilities are read where the plain block reads them (the
        nn.Dropout modules resid_drop and attn.attn_drop, their p and training flag), so changes to them apply.
        ``lora_specs``: read_lora's, for the PEFT LoRA layers on the block's linears."""
        modules = self._modules
        p_attn = _dropout_p("attn.attn_drop", modules["attn"]._modules["attn_drop"])
        p = _dropout_p("resid_drop", modules["resid_drop"])
        drops = p > 0.0 or p_attn > 0.0 or any(s.dropout > 0.0 for s in lora_specs)
        seed = seeds.host_seed() if drops else 0  # DEVICE_SEED under torch.compile
        return BlockConfig(self.spec(lora_specs), self.policy, seed, p_attn, p)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, position_embeddings=None,
                segment_ids: Optional[Tensor] = None) -> Tensor:  # fmt: skip
        self._check_input(x, attn_mask, position_embeddings, segment_ids)
        params = self.parameter_tensors()
        try:
            specs = self.read_lora(params)
        except lora.Unsupported as err:
            if str(err) not in _WARNED:
                _WARNED.add(str(err))
                warnings.warn(f"ckpt_ext: FusedCheckpointBlock runs its plain forward (no checkpointing): {err}",
                              stacklevel=2)  # fmt: skip
            return super().forward(x, attn_mask, position_embeddings, segment_ids)
        return fused_block(x, params, self.block_config(specs), attn_mask, position_embeddings, segment_ids)


def fused_block(x: Tensor, params, cfg: BlockConfig, attn_mask: Optional[Tensor] = None,
                position_embeddings=None, segment_ids: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """Run the block through the op graph. ``params``: a dict by functional.ALL_PARAM_NAMES name, or a sequence in
    ``functional.param_names(cfg)`` order (the GPT-2 block: functional.PARAM_NAMES); strided views such as Wᵀ are fine.

    Under no_grad, or when nothing needs a gradient, no Function is built and nothing is kept. An empty batch (B or
    T = 0) returns an empty output whose gradients are zeros, as the plain block's are.
    """
    check_config(cfg)
    cos, sin = (None, None) if position_embeddings is None else position_embeddings
    _check_no_grad_inputs(attn_mask, cos, sin)
    if not torch.compiler.is_compiling() and _functorch_active(x):
        raise NotImplementedError(
            "ckpt_ext's fused block does not support torch.func transforms (grad, vjp, jvp, vmap, jacrev, ...): its "
            "hand-written backward is an autograd.Function without setup_context/vmap rules. Use "
            "ckpt_ext.TransformerBlock (same parameters and state_dict) under torch.func, or plain autograd "
            "(loss.backward() / torch.autograd.grad) with the fused block"
        )
    names = param_names(cfg)
    if not isinstance(params, dict):
        params = tuple(params)
        if len(params) != len(names):
            raise ValueError(f"expected {len(names)} parameter tensors ({', '.join(names)}), got {len(params)}")
        params = dict(zip(names, params))
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"missing parameter tensors: {', '.join(missing)}")
    for spec in cfg.spec.lora:  # A (r, in), B (out, r) against the adapted weight (out, in)
        out_features, in_features = params[f"w_{spec.target}"].shape
        lora.check_tensors(spec, params[spec.a_name], params[spec.b_name], in_features, out_features)
    tensors = tuple(params[n] for n in names)
    b, t, d = x.shape
    if b * t == 0:
        return x + sum(p.sum() * 0 for p in tensors if p is not None)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad
                                                                      for p in tensors))  # fmt: skip
    if cfg.spec.lora and torch.compiler.is_compiling():
        raise NotImplementedError("ckpt_ext: the fused block with LoRA does not run under torch.compile yet; compile "
                                  "the plain model or run the fused block eagerly")  # fmt: skip
    if cfg.spec.placement == "post" and needs_grad and not torch.compiler.is_compiling():
        cfg = cfg.with_(ln2_from_out=invertible(params.get("ln2_w"), x.dtype, cfg.spec))
    if torch.compiler.is_compiling() and (needs_grad or seeds.is_device_seed(cfg.seed)):
        return compiled_block(x, attn_mask, cos, sin, cfg, tensors, segment_ids)  # opaque ops: the saved set binds
    if not needs_grad:
        rope_cs = None if cos is None else (cos, sin)
        full = dict.fromkeys(ALL_PARAM_NAMES)
        full.update(zip(names, tensors))
        with EagerFastPath(x.device.type):
            out, _ = block_forward(x.reshape(b * t, d), (b, t), full, cfg, attn_mask, rope_cs, segment_ids)
        return out.view(b, t, d)
    return FusedBlockFunction.apply(x, attn_mask, segment_ids, cos, sin, cfg, names, *tensors)


def _check_no_grad_inputs(attn_mask, cos, sin) -> None:
    """The fused block gives no gradient to the mask or the RoPE tables: one that requires grad (a learnable bias, a
    learned rotation) raises instead of training without its gradient (only while grad is on: under no_grad nothing
    would flow anyway)."""
    if not torch.is_grad_enabled():
        return
    for name, t in (("attn_mask", attn_mask), ("position_embeddings cos", cos), ("position_embeddings sin", sin)):
        if t is not None and t.requires_grad:
            raise ValueError(
                f"ckpt_ext's fused block: {name} requires grad, but the block computes no gradient for it (the "
                "attention ops take masks and RoPE tables as constants). Pass it detached (e.g. attn_mask.detach()) "
                "if it is not meant to learn, or use ckpt_ext.TransformerBlock, which differentiates it"
            )


def _functorch_active(x: Tensor) -> bool:
    """True inside a torch.func transform (grad, vjp, jvp, vmap, jacrev, ...): its interpreter stack is not empty,
    or x is one of its wrapped tensors."""
    functorch = torch._C._functorch
    return functorch.peek_interpreter_stack() is not None or functorch.is_functorch_wrapped_tensor(x)


def init_block_(block: TransformerBlock, std: float = 0.02, n_layers: int = 1) -> None:
    """GPT-2 style init: normal(0, std) weights, zero biases, residual projections scaled by 1/sqrt(2 n_layers)."""
    for lin in (m for m in block.modules() if isinstance(m, nn.Linear)):
        nn.init.normal_(lin.weight, std=std)
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
    for lin in (block.attn.proj, block.mlp.proj):
        lin.weight.data.mul_(1.0 / math.sqrt(2 * n_layers))
