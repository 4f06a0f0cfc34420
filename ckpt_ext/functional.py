"""The pre-norm block as one autograd.Function over ``ckpt_ext::*`` ops, with a hand-written backward per policy.

One block, two families, chosen by ``BlockConfig``: GPT-2/ViT (LayerNorm, GELU, one packed q|k|v weight) and the Llama
family (RMSNorm, SwiGLU, separate q/k/v weights, RoPE from the model's (cos, sin), GQA, Qwen3's per-head q/k norm).
Forward (x: (B, T, d) viewed as (N, d), N = B*T; q width h·dh, k/v width hk·dh; H = MLP hidden):
    y1, s1 = norm1(x)                                   q, k, v = y1 @ W_{q,k,v}ᵀ + b   (one GEMM when packed)
    [qk_norm] q, k = rms_norm(q, k per head)            [rope] q, k = rope(q, k, cos, sin)
    o, lse = gqa_attention_fwd(q, k, v)                 x1 = linear_dropout_add(o, Wp, bp, x)       (N, d)
    y2, s2 = norm2(x1)
    GELU:   a = gelu(y2 @ W1ᵀ + b1)      (ffn, block keep no u: linear_bias_gelu, GELU in FC1's epilogue)
    SwiGLU: a = silu(y2 W_gᵀ) · (y2 W_uᵀ) (ffn, block keep no g, u: linear_swiglu, SwiGLU in the epilogue)
    out = linear_dropout_add(a, W2, b2, x1)  (bias, dropout and residual add in the GEMM epilogue)
Backward (dY = d out; df = dropout_add(dY, None) replays the residual dropout mask from its seed):
    GELU    none       dA = df @ W2, dU = gelu_bwd(dA, u), dW2 = dfᵀ @ a
            pointwise  dU = linear_gelu_bwd(df, W2, u) (GELU' in the epilogue), dW2 = gelu_linear_wgrad(df, u)
            ffn, block a, dU, db1 = ffn_recompute(x1, s2, ..., df, W2): LN2 → FC1 beside dA = df @ W2 on one tile
    SwiGLU  none       dH = df @ W2, dg, du = swiglu_bwd(dH, g, u), dW2 = dfᵀ @ h
            pointwise  dg, du = swiglu_linear_bwd(df, W2, g, u), dW2 = swiglu_linear_wgrad(df, g, u)
            ffn, block h, dg, du = swiglu_ffn_recompute(x1, rstd2, ..., df, W2): RMSNorm2 → gate, up, dH on one tile
    then    dY2 = Σ dZ @ W; dx1, dγ2, y2 = norm2_bwd(dY2, x1, s2, dresidual=dY, emit_y); dW = dZᵀ @ y2
    attention: dWp = dprᵀ @ o, do = dpr @ Wp, dq, dk, dv = gqa_attention_bwd(...), rope adjoint, q/k norm backward,
    dY1 = Σ dZ @ W_{q,k,v}, dx = norm1_bwd(dY1, x, s1, dresidual=dx1) + y1 for dW_{q,k,v}.
``block`` first replays the attention half's forward from x and the saved statistics; ``block_keep_attn`` replays it
without the attention core (it kept o and lse). What each policy saves is ``policies.POLICIES[policy].keeps``, read
here and nowhere else. Recompute and backward run under the forward's autocast state (disabled included: an outer
autocast around backward does not leak in). Frozen weights (ctx.needs_input_grad False) skip their dW GEMM and db
reduction and get None; without dx needed and with norm1 frozen, the dY1 GEMM is skipped too. Double backward
(create_graph=True) raises instead of returning wrong second-order gradients.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend, lora, ops
from .policies import get_policy

PARAM_NAMES = (
    "ln1_w",
    "ln1_b",
    "w_qkv",
    "b_qkv",
    "w_proj",
    "b_proj",
    "ln2_w",
    "ln2_b",
    "w_fc",
    "b_fc",
    "w_fc2",
    "b_fc2",
)  # fmt: skip  (the GPT-2 block's parameters, in the order fused_block takes them as a sequence)
ALL_PARAM_NAMES = (
    "ln1_w", "ln1_b", "w_qkv", "b_qkv", "w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "q_norm_w", "k_norm_w",
    "w_proj", "b_proj", "ln2_w", "ln2_b", "w_fc", "b_fc", "w_gate", "b_gate", "w_up", "b_up", "w_fc2", "b_fc2",
)  # fmt: skip
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")


@dataclass(frozen=True)
class BlockConfig:
    n_heads: int
    causal: bool
    eps: float
    approximate: str  # "none" (erf GELU) or "tanh"; unused by SwiGLU
    attn_dropout: float
    dropout: float
    seed: int  # base seed of this call's dropout masks: attention +0, residual 1 +1, residual 2 +2
    policy: str
    norm: str = "layernorm"  # "layernorm" (GPT-2, ViT) or "rmsnorm" (Llama family)
    mlp: str = "gelu"  # "gelu" (fc, proj) or "swiglu" (gate, up, down)
    n_kv_heads: int = 0  # 0: n_heads (MHA)
    head_dim: int = 0  # 0: d_model // n_heads
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    packed_qkv: bool = True  # one (q + 2 kv width, d) weight w_qkv, or w_q, w_k, w_v
    scale: float = 0.0  # softmax scale; 0: head_dim ** -0.5
    lora: tuple = ()  # lora.LoraSpec per adapted linear (PEFT LoRA): its A and B follow the block's parameters

    def __post_init__(self):
        """Numbers become Python numbers (numpy scalars included): the compiled block round-trips a config through
        repr() (compiled.make_spec), and a numpy scalar's repr is not a number."""
        for name, kind in _NUMBER_FIELDS:
            value = getattr(self, name)
            if type(value) is not kind:
                object.__setattr__(self, name, _python_number(f"BlockConfig.{name}", kind, value))
        seed = self.seed
        if type(seed) is not int and isinstance(seed, numbers.Integral):  # a numpy int; not DEVICE_SEED or a SymInt
            object.__setattr__(self, "seed", int(seed))

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def dh(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def softmax_scale(self, d_model: int) -> float:
        return self.scale or self.dh(d_model) ** -0.5


_NUMBER_FIELDS = (("n_heads", int), ("causal", bool), ("eps", float), ("attn_dropout", float), ("dropout", float),
                  ("n_kv_heads", int), ("head_dim", int), ("qk_norm", bool), ("packed_qkv", bool),
                  ("scale", float))  # fmt: skip


def is_numpy_bool(value) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")


def _python_number(what: str, kind: type, value):
    """value as ``kind`` (int, float or bool), for Python and numpy numbers; a clear error for anything else."""
    if kind is bool:
        ok = isinstance(value, numbers.Integral) and value in (0, 1) or is_numpy_bool(value)
    elif kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok:
        raise TypeError(f"{what} must be a Python {kind.__name__}, got {type(value).__name__} {value!r}")
    return kind(value)


def param_names(cfg: BlockConfig) -> tuple[str, ...]:
    """The parameter names a configuration uses, in ALL_PARAM_NAMES order."""
    return _param_names(cfg.norm, cfg.packed_qkv, cfg.qk_norm, cfg.mlp) + lora.param_names(cfg.lora)


@functools.cache
def _param_names(norm: str, packed_qkv: bool, qk_norm: bool, mlp: str) -> tuple[str, ...]:
    names = ["ln1_w", "ln2_w", "w_proj", "b_proj", "w_fc2", "b_fc2"]
    names += ["ln1_b", "ln2_b"] if norm == "layernorm" else []
    names += ["w_qkv", "b_qkv"] if packed_qkv else ["w_q", "b_q", "w_k", "b_k", "w_v", "b_v"]
    names += ["q_norm_w", "k_norm_w"] if qk_norm else []
    names += ["w_fc", "b_fc"] if mlp == "gelu" else ["w_gate", "b_gate", "w_up", "b_up"]
    return tuple(n for n in ALL_PARAM_NAMES if n in names)


def check_config(cfg: BlockConfig) -> None:
    if cfg.norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {cfg.norm!r}")
    if cfg.mlp not in MLPS:
        raise ValueError(f"mlp activation must be one of {MLPS}, got {cfg.mlp!r}")
    if (cfg.norm == "rmsnorm") != (cfg.mlp == "swiglu"):
        raise ValueError("the fused block pairs norm='layernorm' with GELU and norm='rmsnorm' with SwiGLU "
                         f"(got norm={cfg.norm!r}, activation={cfg.mlp!r})")  # fmt: skip
    if cfg.n_heads <= 0 or cfg.kv_heads() <= 0 or cfg.n_heads % cfg.kv_heads() != 0:
        raise ValueError(f"n_kv_heads ({cfg.kv_heads()}) must be positive and divide n_heads ({cfg.n_heads})")
    get_policy(cfg.policy)
    lora.check_specs(cfg.lora, cfg.packed_qkv, cfg.mlp)


class _AutocastState:
    """The forward's autocast state, re-entered for recompute and backward (disabled on devices without autocast)."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        try:
            self.enabled = torch.is_autocast_enabled(device_type)
        except RuntimeError:  # e.g. "meta": no autocast there
            self.enabled = False
        self.dtype = torch.get_autocast_dtype(device_type) if self.enabled else None

    def __call__(self):
        """Enter exactly this state: also *disabled*, so an autocast around backward (or recompute) that the forward
        did not run under does not leak into it. Devices autocast does not know (meta): nothing to enter."""
        if not torch.amp.is_autocast_available(self.device_type):
            return contextlib.nullcontext()
        if not self.enabled:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype)

    def mm(self, t: Optional[Tensor]) -> Optional[Tensor]:
        """Cast an input of a fused matmul op (or of attention) the way autocast casts an aten matmul's."""
        if t is None:
            return None
        return t.to(self.dtype) if self.enabled and t.is_floating_point() else t


# ----------------------------------------------------------------------------------------------------- norms
def _ln_params(w: Optional[Tensor], b: Optional[Tensor], d: int, like: Tensor) -> tuple[Tensor, Tensor]:
    w = w if w is not None else torch.ones(d, dtype=like.dtype, device=like.device)
    b = b if b is not None else torch.zeros(d, dtype=like.dtype, device=like.device)
    return w, b


def _norm_fwd(x: Tensor, p: dict, which: str, cfg: BlockConfig) -> tuple[Tensor, tuple[Tensor, ...]]:
    """x (N, d) -> norm output (N, d), fp32 statistics: (mean, rstd) for LayerNorm, (rstd,) for RMSNorm."""
    if cfg.norm == "rmsnorm":
        y, rstd = _ops.rms_norm_fwd(x, p[f"{which}_w"], cfg.eps)
        return y, (rstd,)
    w, b = _ln_params(p[f"{which}_w"], p[f"{which}_b"], x.shape[1], x)
    y, mean, rstd = _ops.layer_norm_fwd(x, w, b, cfg.eps)
    return y, (mean, rstd)


def _norm_bwd(dy, x, stats, p: dict, which: str, cfg: BlockConfig, dresidual, emit_y: bool, g: dict, want):
    """dx (N, d) (+ dresidual) and the norm's weight grads into g where ``want`` has them (the ops reduce dγ, dβ
    anyway: they have no switch); returns (dx, y or an empty tensor)."""
    if cfg.norm == "rmsnorm":
        dx, dw, y = _ops.rms_norm_bwd(dy.contiguous(), x, stats[0], p[f"{which}_w"], dresidual, emit_y)
        db = None
    else:
        w, b = _ln_params(p[f"{which}_w"], p[f"{which}_b"], x.shape[1], x)
        dx, dw, db, y = _ops.layer_norm_bwd(dy.contiguous(), x, stats[0], stats[1], w, b, dresidual, emit_y)
    g.update((f"{which}_{s}", t) for s, t in (("w", dw), ("b", db)) if f"{which}_{s}" in want)
    return dx, y


# ------------------------------------------------------------------------------------------------------ LoRA
@functools.lru_cache(maxsize=256)
def _lora_by_target(specs: tuple) -> dict:
    return {s.target: s for s in specs}


def _lora_spec(cfg: BlockConfig, target: str):
    """The LoraSpec adapting ``target`` in this configuration, or None."""
    return _lora_by_target(cfg.lora).get(target) if cfg.lora else None


def _lora_on(cfg: BlockConfig, targets) -> bool:
    """Whether LoRA adapts any of ``targets``."""
    return any(_lora_spec(cfg, t) is not None for t in targets)


def _lora_input(y: Tensor, spec, cfg: BlockConfig) -> Tensor:
    """drop(y) with the target's hash mask (its own adjoint: the same call maps a gradient back)."""
    return _ops.dropout_add(y, None, spec.dropout, spec.seed(cfg.seed)) if spec.dropout > 0.0 else y


def _lora_delta(y: Tensor, p: dict, cfg: BlockConfig, spec) -> Tensor:
    """Δ = s · (drop(y) Aᵀ) Bᵀ: y (N, in) -> (N, out), in the adapter's dtype (PEFT casts the input to it)."""
    a = p[spec.a_name]
    z = torch.matmul(_lora_input(y.to(a.dtype), spec, cfg), a.t())  # (N, r)
    return torch.matmul(z * spec.scaling, p[spec.b_name].t())


def _lora_add(out: Tensor, y: Tensor, p: dict, cfg: BlockConfig, target: str) -> Tensor:
    """out (N, o) + Δ when ``target`` carries LoRA (added in the wider dtype, rounded to out's), else out."""
    spec = _lora_spec(cfg, target)
    return out if spec is None else (out + _lora_delta(y, p, cfg, spec)).to(out.dtype)


def _lora_residual(residual: Tensor, a: Tensor, p: dict, cfg: BlockConfig, target: str, seed) -> Tensor:
    """residual + drop_p(Δ) for a residual-branch linear (proj, fc2): the branch's own dropout mask applied to the
    LoRA update, so ``linear_dropout_add(a, W, b, this, p, seed)`` = residual + drop_p(aWᵀ + b + Δ)."""
    spec = _lora_spec(cfg, target)
    if spec is None:
        return residual
    return _ops.dropout_add(_lora_delta(a, p, cfg, spec), residual, cfg.dropout, seed).to(residual.dtype)


def _lora_input_grads(pairs, p: dict, cfg: BlockConfig):
    """[(target, dZ (N, out))] -> (Σ drop(s · dZ B A) (N, in) or None, [(spec, dZ, g = s · dZ B)] for the A/B grads)."""
    extra, pending = None, []
    for target, dz in pairs:
        spec = _lora_spec(cfg, target)
        if spec is None:
            continue
        b = p[spec.b_name]
        gz = torch.matmul(dz.to(b.dtype), b) * spec.scaling  # (N, r)
        term = _lora_input(torch.matmul(gz, p[spec.a_name]), spec, cfg)  # (N, in)
        extra = term if extra is None else extra + term
        pending.append((spec, dz, gz))
    return extra, pending


def _lora_wanted(pending, want) -> bool:
    return any(spec.a_name in want or spec.b_name in want for spec, _, _ in pending)


def _lora_weight_grads(pending, y: Optional[Tensor], p: dict, cfg: BlockConfig, g: dict, want) -> None:
    """dA = gᵀ drop(y) and dB = s · dZᵀ (drop(y) Aᵀ) for each pending target, where ``want`` has them; y (N, in) is
    the linear's input."""
    for spec, dz, gz in pending:
        if spec.a_name not in want and spec.b_name not in want:
            continue
        a, b = p[spec.a_name], p[spec.b_name]
        yd = _lora_input(y.to(a.dtype), spec, cfg)
        if spec.a_name in want:
            g[spec.a_name] = torch.matmul(gz.t(), yd)  # (r, in)
        if spec.b_name in want:
            z = torch.matmul(yd, a.t())  # (N, r), recomputed: no policy keeps it
            g[spec.b_name] = torch.matmul(dz.to(b.dtype).t(), z) * spec.scaling  # (out, r)


def _with_input_grad(acc: Tensor, extra: Optional[Tensor]) -> Tensor:
    return acc if extra is None else acc + extra.to(acc.dtype)


# ------------------------------------------------------------------------------------------- attention half
def _qkv_widths(cfg: BlockConfig, d: int) -> list[int]:
    """Widths of q, k and v in the projection output (and row blocks of a packed q|k|v weight)."""
    dh = cfg.dh(d)
    return [cfg.n_heads * dh, cfg.kv_heads() * dh, cfg.kv_heads() * dh]


def _heads(t: Tensor, shape, dh: int) -> Tensor:
    """(N, heads·dh) or (B, T, heads, dh) -> a (B, T, heads, dh) view."""
    b, t_len = shape
    return t.view(b, t_len, -1, dh)


def _project(x: Tensor, shape, p: dict, cfg: BlockConfig, rope_cs) -> dict:
    """norm1 and the q/k/v projections (with q/k norm and RoPE): the tensors attention reads, and what they came from.

    Returns ln1_out, ln1_stats, qkv (the saved form: (qkv,) packed without RoPE; (q, k, v) with q and k after RoPE;
    with qk_norm the projections before the norm), qk_stats and qk_rope (with qk_norm)."""
    d = x.shape[1]
    dh = cfg.dh(d)
    y1, s1 = _norm_fwd(x, p, "ln1", cfg)
    acts = {"ln1_out": y1, "ln1_stats": s1}
    if cfg.packed_qkv:
        qkv = _lora_add(F.linear(y1, p["w_qkv"], p["b_qkv"]), y1, p, cfg, "qkv")  # (N, (h + 2hk)·dh), one GEMM
        q, k, v = qkv.split_with_sizes(_qkv_widths(cfg, d), 1)
    else:
        q, k, v = (_lora_add(F.linear(y1, p[f"w_{s}"], p[f"b_{s}"]), y1, p, cfg, s) for s in "qkv")  # (N, h·dh), ...
    if cfg.qk_norm:
        acts["qkv"] = (q, k, v)
        q, k, acts["qk_stats"] = _qk_norm(q, k, p, cfg, dh)
    if rope_cs is not None:
        q, k = _ops.rope(_heads(q, shape, dh), _heads(k, shape, dh), rope_cs[0], rope_cs[1], False)
    if cfg.qk_norm:
        acts["qk_rope"] = (_heads(q, shape, dh), _heads(k, shape, dh))
    elif cfg.packed_qkv and rope_cs is None:
        acts["qkv"] = (qkv,)
    else:
        acts["qkv"] = (q, k, v if rope_cs is None or not cfg.packed_qkv else v.contiguous())
    return acts


def _qk_norm(q: Tensor, k: Tensor, p: dict, cfg: BlockConfig, dh: int):
    """Qwen3's RMSNorm over head_dim of every q and k head: (N, h·dh), (N, hk·dh) -> same shapes, rstds."""
    n = q.shape[0]
    qn, rq = _ops.rms_norm_fwd(q.reshape(-1, dh), p["q_norm_w"], cfg.eps)  # (N·h, dh), (N·h,)
    kn, rk = _ops.rms_norm_fwd(k.reshape(-1, dh), p["k_norm_w"], cfg.eps)
    return qn.view(n, -1), kn.view(n, -1), (rq, rk)


def _attention_inputs(acts: dict, p: dict, cfg: BlockConfig, shape, d: int, rope_cs, ac: _AutocastState):
    """q (B, T, h, dh), k, v (B, T, hk, dh) as attention reads them, from the saved (or replayed) tensors."""
    dh = cfg.dh(d)
    if cfg.qk_norm:
        q_pre, k_pre, v = acts["qkv"]
        if "qk_rope" in acts:
            q, k = acts["qk_rope"]
        else:  # rebuilt: the norm and rotation of the saved projections (pointwise)
            q, k, _ = _qk_norm(q_pre, k_pre, p, cfg, dh)
            q, k = (_heads(q, shape, dh), _heads(k, shape, dh))
            if rope_cs is not None:
                q, k = _ops.rope(q, k, rope_cs[0], rope_cs[1], False)
    elif len(acts["qkv"]) == 1:
        q, k, v = acts["qkv"][0].split_with_sizes(_qkv_widths(cfg, d), 1)
    else:
        q, k, v = acts["qkv"]
    return tuple(ac.mm(_heads(t, shape, dh)) for t in (q, k, v))


def attention_half(x: Tensor, shape, p: dict, cfg: BlockConfig, attn_mask, rope_cs=None, attn=None,
                   segment_ids=None) -> dict:  # fmt: skip
    """x (N, d) -> the attention half's tensors (policies.py names). ``attn`` = (attn_out, attn_lse) kept by
    block_keep_attn: then the attention core is not run again. segment_ids (B, T): see ops/attention.py."""
    ac = _AutocastState(x.device.type)
    d = x.shape[1]
    acts = _project(x, shape, p, cfg, rope_cs)
    if attn is None:
        q, k, v = _attention_inputs(acts, p, cfg, shape, d, rope_cs, ac)
        o, lse = _ops.gqa_attention_fwd(q, k, v, cfg.causal, cfg.attn_dropout, cfg.seed, attn_mask,
                                       cfg.softmax_scale(d), segment_ids)  # fmt: skip
        attn = (o.view(x.shape[0], -1), lse)  # (N, h·dh), (B, h, T)
    acts["attn_out"], acts["attn_lse"] = attn
    residual = _lora_residual(x, acts["attn_out"], p, cfg, "proj", cfg.seed + 1)
    acts["x1"] = _ops.linear_dropout_add(
        ac.mm(acts["attn_out"]), ac.mm(p["w_proj"]), ac.mm(p["b_proj"]), residual, cfg.dropout, cfg.seed + 1
    )
    return acts


# ------------------------------------------------------------------------------------------------- MLP half
def ffn_half(x1: Tensor, p: dict, cfg: BlockConfig) -> tuple[Tensor, dict]:
    """x1 (N, d) -> out (N, d) and ln2_out, ln2_stats, fc1_out (if the policy keeps it), act_out (N, H).

    Policies that do not keep the pre-activations (ffn, block, block_keep_attn) run the first matmul(s) with the
    activation in the epilogue, so u (or g and u) are never written."""
    ac = _AutocastState(x1.device.type)
    y2, s2 = _norm_fwd(x1, p, "ln2", cfg)
    acts = {"ln2_out": y2, "ln2_stats": s2}
    keep_pre = "fc1_out" in get_policy(cfg.policy).keeps
    unfused = keep_pre or _lora_on(cfg, ("fc", "gate", "up"))  # LoRA joins the pre-activations before the activation
    if cfg.mlp == "swiglu":
        if unfused:
            g, u = _first_linears(y2, p, cfg)  # 2 x (N, H)
            a = _ops.swiglu_fwd(g, u)
            if keep_pre:
                acts["fc1_out"] = (g, u)
        else:
            a = _ops.linear_swiglu(ac.mm(y2), ac.mm(p["w_gate"]), ac.mm(p["b_gate"]), ac.mm(p["w_up"]),
                                  ac.mm(p["b_up"]))  # fmt: skip
    elif unfused:
        (u,) = _first_linears(y2, p, cfg)  # (N, H)
        a = _ops.bias_gelu(u, None, cfg.approximate)
        if keep_pre:
            acts["fc1_out"] = (u,)
    else:
        a = _ops.linear_bias_gelu(ac.mm(y2), ac.mm(p["w_fc"]), ac.mm(p["b_fc"]), cfg.approximate)  # (N, H)
    acts["act_out"] = a
    residual = _lora_residual(x1, a, p, cfg, "fc2", cfg.seed + 2)
    out = _ops.linear_dropout_add(ac.mm(a), ac.mm(p["w_fc2"]), ac.mm(p["b_fc2"]), residual, cfg.dropout, cfg.seed + 2)
    return out, acts


def _first_linears(y2: Tensor, p: dict, cfg: BlockConfig) -> tuple[Tensor, ...]:
    """The MLP's pre-activations with their LoRA updates: (u,) for GELU, (g, u) for SwiGLU, each (N, H)."""
    if cfg.mlp == "swiglu":
        return tuple(_lora_add(F.linear(y2, p[f"w_{s}"], p[f"b_{s}"]), y2, p, cfg, s) for s in ("gate", "up"))
    return (_lora_add(F.linear(y2, p["w_fc"], p["b_fc"]), y2, p, cfg, "fc"),)


def block_forward(x: Tensor, shape, params: dict, cfg: BlockConfig, attn_mask, rope_cs=None,
                  segment_ids=None) -> tuple[Tensor, dict]:  # fmt: skip
    acts = attention_half(x, shape, params, cfg, attn_mask, rope_cs, segment_ids=segment_ids)
    out, ffn_acts = ffn_half(acts["x1"], params, cfg)
    acts.update(ffn_acts)
    acts["x"] = x
    return out, acts


# -------------------------------------------------------------------------------------------------- backward
def _sum_rows(t: Tensor, like: Optional[Tensor]) -> Optional[Tensor]:
    if like is None:
        return None
    s = t.sum(dim=0)
    return s if s.dtype == like.dtype else s.to(like.dtype)


def _input_grad(pairs) -> Tensor:
    """Σ dZ @ W over (dZ (N, out), W (out, K)) pairs: the gradient of the input the projections share."""
    (dz, w), *rest = pairs
    acc = torch.matmul(dz, w)
    for dz, w in rest:
        acc = torch.addmm(acc, dz, w)
    return acc


def _dropout_grad(grad: Tensor, p: float, seed: int) -> Tensor:
    """Gradient through a residual branch's dropout: the same hash mask, replayed from the seed."""
    return _ops.dropout_add(grad, None, p, seed) if p > 0.0 else grad


def _bias(b: Optional[Tensor], w: Tensor) -> Tensor:
    return b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)


def _mlp_backward(dfm: Tensor, acts: dict, p: dict, cfg: BlockConfig, ac: _AutocastState, g: dict, want):
    """The MLP's activation and down-projection backward: [(weight, bias, dZ)] of its first matmul(s). dW_down
    (and the recompute kernels' db1) only where ``want`` has it."""
    policy, x1 = cfg.policy, acts["x1"]
    if _lora_on(cfg, lora.MLP_TARGETS):
        return _mlp_backward_lora(dfm, acts, p, cfg, g, want)
    need_w2 = "w_fc2" in want
    if cfg.mlp == "gelu":
        if policy == "none":
            (u,) = acts["fc1_out"]
            du = _ops.gelu_bwd(torch.matmul(dfm, p["w_fc2"]), u, cfg.approximate)  # (N, H)
            if need_w2:
                g["w_fc2"] = torch.matmul(dfm.t(), acts["act_out"])
        elif policy == "pointwise":
            (u,) = acts["fc1_out"]
            du = _ops.linear_gelu_bwd(dfm, ac.mm(p["w_fc2"]), u, cfg.approximate)
            if need_w2:
                g["w_fc2"] = _ops.gelu_linear_wgrad(dfm, u, cfg.approximate)
        else:
            m2, r2 = acts["ln2_stats"]
            ln2_w, ln2_b = _ln_params(p["ln2_w"], p["ln2_b"], x1.shape[1], x1)
            b1 = ac.mm(_bias(p["b_fc"], p["w_fc"]))
            a, du, db1 = _ops.ffn_recompute(x1, m2, r2, ln2_w, ln2_b, ac.mm(p["w_fc"]), b1, dfm, ac.mm(p["w_fc2"]),
                                           cfg.approximate)  # fmt: skip
            if need_w2:
                g["w_fc2"] = torch.matmul(dfm.t(), a)
            del a
            if "b_fc" in want:
                g["b_fc"] = db1.to(p["b_fc"].dtype)
            return [("w_fc", None, du)]
        return [("w_fc", "b_fc", du)]
    if policy == "none":
        gt, ut = acts["fc1_out"]
        dg, du = _ops.swiglu_bwd(torch.matmul(dfm, p["w_fc2"]), gt, ut)  # 2 x (N, H)
        if need_w2:
            g["w_fc2"] = torch.matmul(dfm.t(), acts["act_out"])
    elif policy == "pointwise":
        gt, ut = acts["fc1_out"]
        dg, du = _ops.swiglu_linear_bwd(dfm, ac.mm(p["w_fc2"]), gt, ut)
        if need_w2:
            g["w_fc2"] = _ops.swiglu_linear_wgrad(dfm, gt, ut)
    else:
        (r2,) = acts["ln2_stats"]
        h, dg, du = _ops.swiglu_ffn_recompute(x1, r2, p["ln2_w"], ac.mm(p["w_gate"]), ac.mm(p["b_gate"]),
                                             ac.mm(p["w_up"]), ac.mm(p["b_up"]), dfm, ac.mm(p["w_fc2"]))  # fmt: skip
        if need_w2:
            g["w_fc2"] = torch.matmul(dfm.t(), h)
        del h
    return [("w_gate", "b_gate", dg), ("w_up", "b_up", du)]


def _mlp_backward_lora(dfm: Tensor, acts: dict, p: dict, cfg: BlockConfig, g: dict, want):
    """The MLP backward when LoRA adapts one of its linears, from pointwise ops (the fused recompute kernels have no
    low-rank term): ffn / block rebuild norm2 → FC1 (with its LoRA) here, as their table says, then dA = dY·W_down +
    LoRA's input gradient and the activation's backward."""
    pre = acts.get("fc1_out")
    if pre is None:  # ffn, block, block_keep_attn: rebuild the pre-activations from x1 (norm2 replayed)
        y2, _ = _norm_fwd(acts["x1"], p, "ln2", cfg)
        acts["ln2_out"] = y2  # norm2's backward need not emit it again
        pre = _first_linears(y2, p, cfg)
    if "act_out" in acts:
        a = acts["act_out"]
    else:
        a = _ops.bias_gelu(pre[0], None, cfg.approximate) if cfg.mlp == "gelu" else _ops.swiglu_fwd(*pre)  # (N, H)
    if "w_fc2" in want:
        g["w_fc2"] = torch.matmul(dfm.t(), a)
    extra, pending = _lora_input_grads([("fc2", dfm)], p, cfg)
    da = _with_input_grad(torch.matmul(dfm, p["w_fc2"]), extra)  # (N, H)
    _lora_weight_grads(pending, a, p, cfg, g, want)
    del a
    if cfg.mlp == "gelu":
        return [("w_fc", "b_fc", _ops.gelu_bwd(da, pre[0], cfg.approximate))]
    dg, du = _ops.swiglu_bwd(da, *pre)
    return [("w_gate", "b_gate", dg), ("w_up", "b_up", du)]


def _attention_backward(dpr: Tensor, acts: dict, p: dict, cfg: BlockConfig, shape, attn_mask, rope_cs, ac, g,
                        segment_ids=None, want=frozenset()):  # fmt: skip
    """From the o_proj input gradient to [(weight, name, dZ (N, width))] of the q, k, v projections (packed: one).
    dW_o and the q/k norm weight grads only where ``want`` has them."""
    b, t = shape
    d = acts["x"].shape[1]
    dh = cfg.dh(d)
    dprm = ac.mm(dpr)
    if "w_proj" in want:
        g["w_proj"] = torch.matmul(dprm.t(), acts["attn_out"])
    extra, pending = _lora_input_grads([("proj", dprm)], p, cfg)
    do = _with_input_grad(torch.matmul(dprm, p["w_proj"]), extra)  # (N, h·dh)
    _lora_weight_grads(pending, acts["attn_out"], p, cfg, g, want)
    del dprm
    q, k, v = _attention_inputs(acts, p, cfg, shape, d, rope_cs, ac)
    o = _heads(acts["attn_out"], shape, dh)
    dq, dk, dv = _ops.gqa_attention_bwd(_heads(do, shape, dh).contiguous(), q, k, v, o, acts["attn_lse"], cfg.causal,
                                       cfg.attn_dropout, cfg.seed, attn_mask, cfg.softmax_scale(d),
                                       segment_ids)  # fmt: skip
    del q, k, v, do
    if rope_cs is not None:
        dq, dk = _ops.rope(dq, dk, rope_cs[0], rope_cs[1], True)  # the rotation's adjoint
    n = b * t
    dq, dk, dv = dq.reshape(n, -1), dk.reshape(n, -1), dv.reshape(n, -1)
    if cfg.qk_norm:  # the op reduces dγ anyway (it has no switch); a frozen norm weight just drops it
        q_pre, k_pre, _ = acts["qkv"]
        rq, rk = acts["qk_stats"]
        dq, dwq, _ = _ops.rms_norm_bwd(dq.reshape(-1, dh), q_pre.reshape(-1, dh), rq, p["q_norm_w"], None, False)
        dk, dwk, _ = _ops.rms_norm_bwd(dk.reshape(-1, dh), k_pre.reshape(-1, dh), rk, p["k_norm_w"], None, False)
        g.update((name, dw) for name, dw in (("q_norm_w", dwq), ("k_norm_w", dwk)) if name in want)
        dq, dk = dq.view(n, -1), dk.view(n, -1)
    if cfg.packed_qkv:  # one (N, q + 2 kv width) gradient in w_qkv's row order: one GEMM each for dY1 and dW_qkv
        return [(p["w_qkv"], "qkv", torch.cat((dq, dk, dv), dim=1))]
    return [(p[f"w_{s}"], s, dz) for s, dz in zip("qkv", (dq, dk, dv))]


def _projection_wgrads(pairs, y: Optional[Tensor], p: dict, g: dict, want) -> None:
    """dW = dZᵀ @ y and db = Σ dZ for the q, k, v projections (or the packed q|k|v one), where ``want`` has them."""
    for _, s, dz in pairs:
        if f"w_{s}" in want:
            g[f"w_{s}"] = torch.matmul(dz.t(), y)
        if f"b_{s}" in want:
            g[f"b_{s}"] = _sum_rows(dz, p[f"b_{s}"])


def wanted(p: dict, needs) -> frozenset:
    """The names of the present parameters whose gradient is wanted: all (``needs`` None) or those in ``needs``."""
    return frozenset(n for n, t in p.items() if t is not None and (needs is None or n in needs))


def block_backward(dout: Tensor, acts: dict, p: dict, cfg: BlockConfig, shape, attn_mask, ac: _AutocastState,
                   rope_cs=None, segment_ids=None, needs=None):  # fmt: skip
    """dout (N, d) -> dx (N, d) and a dict of parameter grads. ``acts`` holds the policy's saved tensors.

    ``needs``: None (every gradient), or the names wanted: parameter names, and "x" for dx. A frozen weight's dW GEMM
    and a frozen bias's reduction are skipped (norm weights: the norm backward op reduces them anyway; dropped), and
    it has no entry in the dict. Without "x", and with both norm1 weights frozen, dx (None) and its Σ dZ W_{q,k,v}
    GEMM are skipped too."""
    want = wanted(p, needs)
    x, x1 = acts["x"], acts["x1"]
    g: dict = {}

    # ---- MLP half (a gradient that feeds two matmuls is cast to the autocast dtype once: dfm)
    df = _dropout_grad(dout, cfg.dropout, cfg.seed + 2)  # (N, d)
    if "b_fc2" in want:
        g["b_fc2"] = _sum_rows(df, p["b_fc2"])
    dfm = ac.mm(df)
    mlp = _mlp_backward(dfm, acts, p, cfg, ac, g, want)
    del dfm, df
    extra, lora_mlp = _lora_input_grads([(w[2:], dz) for w, _, dz in mlp], p, cfg)
    dy2 = _with_input_grad(_input_grad([(dz, p[w]) for w, _, dz in mlp]), extra)  # (N, d)
    emit_y2 = "ln2_out" not in acts and (any(w in want for w, _, _ in mlp) or _lora_wanted(lora_mlp, want))
    dx1, y2 = _norm_bwd(dy2, x1, acts["ln2_stats"], p, "ln2", cfg, dout, emit_y2, g, want)
    y2 = acts.get("ln2_out", y2)
    for w, bname, dz in mlp:
        if w in want:
            g[w] = torch.matmul(dz.t(), y2)
        if bname in want:
            g[bname] = _sum_rows(dz, p[bname])
    _lora_weight_grads(lora_mlp, y2, p, cfg, g, want)
    del mlp, dy2, y2

    # ---- attention half
    dpr = _dropout_grad(dx1, cfg.dropout, cfg.seed + 1)  # (N, d)
    if "b_proj" in want:
        g["b_proj"] = _sum_rows(dpr, p["b_proj"])
    proj = _attention_backward(dpr, acts, p, cfg, shape, attn_mask, rope_cs, ac, g, segment_ids, want)
    del dpr
    extra, lora_qkv = _lora_input_grads([(s, dz) for _, s, dz in proj], p, cfg)
    need_y1 = any(f"w_{s}" in want for _, s, _ in proj) or _lora_wanted(lora_qkv, want)
    if needs is None or "x" in needs or "ln1_w" in want or "ln1_b" in want:
        dy1 = _with_input_grad(_input_grad([(dz, w) for w, _, dz in proj]), extra)  # (N, d)
        dx, y1 = _norm_bwd(dy1, x, acts["ln1_stats"], p, "ln1", cfg, dx1, need_y1 and "ln1_out" not in acts, g, want)
    else:  # nothing below the q/k/v projections needs a gradient
        dx = None
        y1 = _norm_fwd(x, p, "ln1", cfg)[0] if need_y1 and "ln1_out" not in acts else None
    y1 = acts.get("ln1_out", y1)
    _projection_wgrads(proj, y1, p, g, want)
    _lora_weight_grads(lora_qkv, y1, p, cfg, g, want)
    return dx, g


# ------------------------------------------------------------------------------------------ autograd.Function
def _flatten_saved(acts: dict, keeps: tuple[str, ...]) -> tuple[list[Tensor], tuple[tuple[str, int], ...]]:
    """The kept tensors in table order and the (name, count) layout to rebuild the dict (absent names skipped)."""
    flat, layout = [], []
    for name in keeps:
        if name not in acts:
            continue
        v = acts[name]
        v = v if isinstance(v, tuple) else (v,)
        flat.extend(v)
        layout.append((name, len(v)))
    return flat, tuple(layout)


def _unflatten_saved(tensors, layout) -> dict:
    it = iter(tensors)
    acts = {}
    for name, count in layout:
        v = tuple(next(it) for _ in range(count))
        acts[name] = v if name.endswith("_stats") or name in ("qkv", "fc1_out", "qk_rope") else v[0]
    return acts


_fast_path = threading.local()  # .table: backend.kernel_table of the device the fast path runs on, else None


class _BlockOps:
    """The ckpt_ext ops the block calls: ``_ops.<name>(*args)``. Normally the graph op ``ops.<name>``. On the eager
    fast path (``EagerFastPath``) the kernel that graph op's body calls, ``backend.kernel(name, device)``, is called
    directly instead: the same function on the same arguments, without torch's Python custom-op wrapper (~25 µs a call
    at tiny shapes, 10-20 ops a step) and without the body's argument checks (the block checked its inputs). So the
    results are the same bit for bit; under tracing, compile and dispatch modes the graph ops run (what is measured)."""

    def __getattr__(self, name: str):
        graph_op = getattr(ops, name)

        def call(*args):
            table = getattr(_fast_path, "table", None)
            return graph_op(*args) if table is None else table[name](*args)

        setattr(self, name, call)
        return call


_ops = _BlockOps()


class EagerFastPath:
    """Entered around the block's hand-written forward and backward (and its no-grad forward), eager only:
    - dispatch below the Autograd keys: its ops are never differentiated there (forward runs without grad, a double
      backward raises), so each aten op skips its autograd kernel; autocast and version counters still apply (their
      keys are not excluded);
    - the ckpt_ext ops call their kernels directly (``_BlockOps``), resolved once per entry for ``device_type``.
    Off while a TorchDispatchMode is active (FakeTensorMode, FlopCounterMode, the roofline's recorder, op counters):
    below Autograd, composite ops (linear, matmul) would reach the mode undecomposed and uncounted, and the mode must
    see the graph ops. Under torch.compile the block runs as compiled.py's opaque ops instead."""

    def __init__(self, device_type: str):
        self.device_type = device_type

    def __enter__(self):
        self.active = not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
        if self.active:
            self.previous = getattr(_fast_path, "table", None)
            self.below = torch._C._AutoDispatchBelowAutograd()
            self.below.__enter__()
            _fast_path.table = backend.kernel_table(self.device_type)
        return self

    def __exit__(self, *exc):
        if self.active:
            _fast_path.table = self.previous
            self.below.__exit__(*exc)


def forward_saved(x: Tensor, shape, p: dict, cfg: BlockConfig, attn_mask, rope_cs, segment_ids):
    """x (N, d) -> out (N, d), the tensors the policy keeps (POLICIES[policy].keeps order) and their layout."""
    out, acts = block_forward(x, shape, p, cfg, attn_mask, rope_cs, segment_ids)
    flat, layout = _flatten_saved(acts, get_policy(cfg.policy).keeps)
    return out, flat, layout


def backward_from_saved(dout: Tensor, flat, layout, p: dict, cfg: BlockConfig, shape, attn_mask, rope_cs,
                        segment_ids, ac: _AutocastState, needs=None):  # fmt: skip
    """dout (N, d) and forward_saved's kept tensors -> dx (N, d), parameter grads by name (``needs``: see
    block_backward). The block policies first replay the attention half (block_keep_attn without its core: it kept o
    and lse)."""
    acts = _unflatten_saved(flat, layout)
    if cfg.policy in ("block", "block_keep_attn"):
        kept = (acts["attn_out"], acts["attn_lse"]) if cfg.policy == "block_keep_attn" else None
        replay = attention_half(acts["x"], shape, p, cfg, attn_mask, rope_cs, kept, segment_ids)
        replay.pop("ln1_out")  # norm1's backward emits it again when dW_qkv needs it
        replay.pop("ln1_stats")
        acts.update(replay)
    return block_backward(dout, acts, p, cfg, shape, attn_mask, ac, rope_cs, segment_ids, needs)


def needed_grads(names: tuple, needs_input_grad) -> frozenset:
    """From an autograd ctx's needs_input_grad (x first, the parameters last, in ``names`` order): the names
    block_backward computes — "x" and the parameters that need a gradient (frozen weights skip their dW / db)."""
    needs = [n for n, need in zip(names, needs_input_grad[len(needs_input_grad) - len(names) :]) if need]
    return frozenset(needs + ["x"] if needs_input_grad[0] else needs)


class FusedBlockFunction(torch.autograd.Function):
    """x (B, T, d), attn_mask, segment_ids, cos, sin, cfg, names, *params (``names`` order) -> out (B, T, d)."""

    @staticmethod
    def forward(ctx, x, attn_mask, segment_ids, cos, sin, cfg: BlockConfig, names: tuple, *params):
        b, t, d = x.shape
        x2 = x.reshape(b * t, d)
        with EagerFastPath(x.device.type):
            p = dict.fromkeys(ALL_PARAM_NAMES)
            p.update(zip(names, params))
            rope_cs = None if cos is None else (cos, sin)
            out, flat, layout = forward_saved(x2, (b, t), p, cfg, attn_mask, rope_cs, segment_ids)
        ctx.layout = layout
        # flat[0] is x2: a copy of x when x is not viewable as (N, d) (e.g. a transposed input); keep the caller's x
        ctx.save_for_backward(attn_mask, segment_ids, cos, sin, *params, x, *flat[1:])
        ctx.cfg, ctx.shape, ctx.names = cfg, (b, t), names
        ctx.autocast = _AutocastState(x.device.type)
        ctx.backend = backend.get_backend()  # backward runs on the forward's backend (on CUDA, autograd's own thread)
        return out.view(b, t, d)

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "ckpt_ext's fused block does not support double backward (create_graph=True, e.g. gradient penalties): "
                "its backward is hand-written and not itself differentiable; use ckpt_ext.TransformerBlock there"
            )
        saved = ctx.saved_tensors
        attn_mask, segment_ids, cos, sin = saved[:4]
        k = len(ctx.names)
        params, (x, *flat) = saved[4 : 4 + k], saved[4 + k :]
        cfg, (b, t) = ctx.cfg, ctx.shape
        d = dout.shape[-1]
        flat = (x.reshape(b * t, d), *flat)
        dout2 = dout.reshape(b * t, d)
        needs = needed_grads(ctx.names, ctx.needs_input_grad)
        with backend.set_backend(ctx.backend), ctx.autocast(), EagerFastPath(dout.device.type):
            p = dict.fromkeys(ALL_PARAM_NAMES)
            p.update(zip(ctx.names, params))
            rope_cs = None if cos is None else (cos, sin)
            dx, g = backward_from_saved(dout2, flat, ctx.layout, p, cfg, (b, t), attn_mask, rope_cs, segment_ids,
                                        ctx.autocast, needs)  # fmt: skip
            grads = tuple(g.get(name) for name in ctx.names)
        dx = None if dx is None else dx.view(b, t, d)
        return (dx, None, None, None, None, None, None, *grads)
