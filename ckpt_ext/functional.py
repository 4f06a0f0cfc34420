"""The pre-LN block as one autograd.Function over ``ckpt_ext::*`` ops, with a hand-written backward per policy.

Forward (x: (B, T, d) viewed as (N, d), N = B*T; H = FFN hidden):
    y1, m1, r1 = layer_norm_fwd(x)                  qkv = y1 @ Wqkvᵀ + bqkv               (N, 3d)
    o, lse = attention_fwd(qkv)                     x1 = linear_dropout_add(o, Wp, bp, x)  (N, d)
    y2, m2, r2 = layer_norm_fwd(x1)                 u = y2 @ W1ᵀ + b1, a = bias_gelu(u)    (N, H)
                        (ffn, block keep no u: a = linear_bias_gelu(y2, W1, b1), GELU in FC1's epilogue)
    out = linear_dropout_add(a, W2, b2, x1)  (bias, dropout and residual add in the GEMM epilogue)
Backward (dY = d out; df = dropout_add(dY, None) replays the residual dropout mask from its seed):
    none       dA = df @ W2, dU = gelu_bwd(dA, u), dW2 = dfᵀ @ a
    pointwise  dU = linear_gelu_bwd(df, W2, u) (GELU' in the GEMM epilogue), dW2 = gelu_linear_wgrad(df, u) (GELU in
               the prologue)
    ffn, block a, dU, db1 = ffn_recompute(x1, m2, r2, ..., df, W2): FC1 (LN2 in its prologue) and dA = df @ W2 share
               one output tile, GELU/GELU'·dA/Σ dU in the epilogue; dW2 = dfᵀ @ a
    then       dY2 = dU @ W1; dx1, dγ2, dβ2, y2 = layer_norm_bwd(dY2, x1, m2, r2, dresidual=dY, emit_y); dW1 = dUᵀ @ y2
    and the attention half the same way (dW_qkv = dqkvᵀ @ y1 with y1 emitted by LN1's backward).
``block`` first replays the attention half's forward from x and the saved statistics. What each policy saves is
``policies.POLICIES[policy].keeps``, read here and nowhere else. Recompute runs under the forward's autocast state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .policies import get_policy

PARAM_NAMES = (
    "ln1_w", "ln1_b", "w_qkv", "b_qkv", "w_proj", "b_proj",
    "ln2_w", "ln2_b", "w_fc", "b_fc", "w_fc2", "b_fc2",
)  # fmt: skip


@dataclass(frozen=True)
class BlockConfig:
    n_heads: int
    causal: bool
    eps: float
    approximate: str  # "none" (erf GELU) or "tanh"
    attn_dropout: float
    dropout: float
    seed: int  # base seed of this call's dropout masks: attention +0, residual 1 +1, residual 2 +2
    policy: str


def _ln_params(w: Optional[Tensor], b: Optional[Tensor], d: int, like: Tensor) -> tuple[Tensor, Tensor]:
    w = w if w is not None else torch.ones(d, dtype=like.dtype, device=like.device)
    b = b if b is not None else torch.zeros(d, dtype=like.dtype, device=like.device)
    return w, b


def attention_half(x: Tensor, shape: tuple[int, int], p: dict, cfg: BlockConfig, attn_mask: Optional[Tensor]) -> dict:
    """x (N, d) -> ln1_out, ln1 stats, qkv (N, 3d), attn_out (N, d), attn_lse (B, h, T), x1 (N, d)."""
    b, t = shape
    d = x.shape[1]
    ln1_w, ln1_b = _ln_params(p["ln1_w"], p["ln1_b"], d, x)
    y1, m1, r1 = ops.layer_norm_fwd(x, ln1_w, ln1_b, cfg.eps)
    qkv = F.linear(y1, p["w_qkv"], p["b_qkv"])  # (N, 3d)
    o, lse = ops.attention_fwd(qkv.view(b, t, 3 * d), cfg.n_heads, cfg.causal, cfg.attn_dropout, cfg.seed, attn_mask)
    o = o.view(b * t, d)
    ac = _AutocastState(x.device.type)
    x1 = ops.linear_dropout_add(ac.mm(o), ac.mm(p["w_proj"]), _opt(ac.mm, p["b_proj"]), x, cfg.dropout, cfg.seed + 1)
    return {"ln1_out": y1, "ln1_stats": (m1, r1), "qkv": qkv, "attn_out": o, "attn_lse": lse, "x1": x1}


def ffn_half(x1: Tensor, p: dict, cfg: BlockConfig) -> tuple[Tensor, dict]:
    """x1 (N, d) -> out (N, d) and ln2_out, ln2 stats, fc1_out (N, H) if the policy keeps it, gelu_out (N, H).

    Policies that do not keep u (ffn, block) run FC1 with bias + GELU in its epilogue, so u is never written.
    """
    ac = _AutocastState(x1.device.type)
    ln2_w, ln2_b = _ln_params(p["ln2_w"], p["ln2_b"], x1.shape[1], x1)
    y2, m2, r2 = ops.layer_norm_fwd(x1, ln2_w, ln2_b, cfg.eps)
    acts = {"ln2_out": y2, "ln2_stats": (m2, r2)}
    if "fc1_out" in get_policy(cfg.policy).keeps:
        u = F.linear(y2, p["w_fc"], p["b_fc"])  # (N, H)
        a = ops.bias_gelu(u, None, cfg.approximate)  # (N, H)
        acts["fc1_out"] = u
    else:
        a = ops.linear_bias_gelu(ac.mm(y2), ac.mm(p["w_fc"]), _opt(ac.mm, p["b_fc"]), cfg.approximate)  # (N, H)
    acts["gelu_out"] = a
    out = ops.linear_dropout_add(ac.mm(a), ac.mm(p["w_fc2"]), _opt(ac.mm, p["b_fc2"]), x1, cfg.dropout, cfg.seed + 2)
    return out, acts


def _opt(fn, t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else fn(t)


def block_forward(x: Tensor, shape, params: dict, cfg: BlockConfig, attn_mask: Optional[Tensor]) -> tuple[Tensor, dict]:
    acts = attention_half(x, shape, params, cfg, attn_mask)
    out, ffn_acts = ffn_half(acts["x1"], params, cfg)
    acts.update(ffn_acts)
    acts["x"] = x
    return out, acts


def _flatten_saved(acts: dict, keeps: tuple[str, ...]) -> list[Tensor]:
    flat = []
    for name in keeps:
        v = acts[name]
        flat.extend(v if isinstance(v, tuple) else (v,))
    return flat


def _unflatten_saved(tensors, keeps: tuple[str, ...]) -> dict:
    it = iter(tensors)
    return {name: (next(it), next(it)) if name.endswith("_stats") else next(it) for name in keeps}


def _sum_rows(t: Tensor, like: Optional[Tensor]) -> Optional[Tensor]:
    return None if like is None else t.sum(dim=0).to(like.dtype)


class _AutocastState:
    """The forward's autocast state, re-entered for recompute and backward."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type) if self.enabled else None

    def __call__(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def mm(self, t: Tensor) -> Tensor:
        """Cast an input of a fused matmul op the way autocast casts an aten matmul's."""
        return t.to(self.dtype) if self.enabled and t.is_floating_point() else t


def block_backward(dout: Tensor, acts: dict, p: dict, cfg: BlockConfig, shape, attn_mask, ac: _AutocastState):
    """dout (N, d) -> dx (N, d) and a dict of parameter grads. ``acts`` holds the policy's saved tensors."""
    b, t = shape
    x, x1 = acts["x"], acts["x1"]
    n, d = x.shape
    policy = cfg.policy
    m2, r2 = acts["ln2_stats"]
    ln2_w, ln2_b = _ln_params(p["ln2_w"], p["ln2_b"], d, x1)
    g: dict = {}

    # ---- FFN half (a gradient that feeds two matmuls is cast to the autocast dtype once: dfm, dprm)
    df = _dropout_grad(dout, cfg.dropout, cfg.seed + 2)  # (N, d)
    g["b_fc2"] = _sum_rows(df, p["b_fc2"])
    dfm = ac.mm(df)
    if policy == "none":
        da = torch.matmul(dfm, p["w_fc2"])  # (N, H)
        du = ops.gelu_bwd(da, acts["fc1_out"], cfg.approximate)
        g["w_fc2"] = torch.matmul(dfm.t(), acts["gelu_out"])
        g["b_fc"] = _sum_rows(du, p["b_fc"])
    elif policy == "pointwise":
        du = ops.linear_gelu_bwd(dfm, ac.mm(p["w_fc2"]), acts["fc1_out"], cfg.approximate)
        g["w_fc2"] = ops.gelu_linear_wgrad(dfm, acts["fc1_out"], cfg.approximate)
        g["b_fc"] = _sum_rows(du, p["b_fc"])
    else:
        a, du, db1 = ops.ffn_recompute(x1, m2, r2, ln2_w, ln2_b, ac.mm(p["w_fc"]), ac.mm(_bias(p["b_fc"], p["w_fc"])),
                                       dfm, ac.mm(p["w_fc2"]), cfg.approximate)  # fmt: skip
        g["w_fc2"] = torch.matmul(dfm.t(), a)
        g["b_fc"] = None if p["b_fc"] is None else db1.to(p["b_fc"].dtype)
        del a
    del dfm
    dy2 = torch.matmul(du, p["w_fc"])  # (N, d)
    dx1, g["ln2_w"], g["ln2_b"], y2 = ops.layer_norm_bwd(
        dy2.contiguous(), x1, m2, r2, ln2_w, ln2_b, dout, policy != "none"
    )
    y2 = acts["ln2_out"] if policy == "none" else y2
    g["w_fc"] = torch.matmul(du.t(), y2)
    del du, dy2, y2

    # ---- attention half
    m1, r1 = acts["ln1_stats"]
    ln1_w, ln1_b = _ln_params(p["ln1_w"], p["ln1_b"], d, x)
    dpr = _dropout_grad(dx1, cfg.dropout, cfg.seed + 1)  # (N, d)
    g["b_proj"] = _sum_rows(dpr, p["b_proj"])
    dprm = ac.mm(dpr)
    g["w_proj"] = torch.matmul(dprm.t(), acts["attn_out"])
    do = torch.matmul(dprm, p["w_proj"])  # (N, d)
    del dprm
    dqkv = ops.attention_bwd(
        do.view(b, t, d).contiguous(), acts["qkv"].view(b, t, 3 * d), acts["attn_out"].view(b, t, d),
        acts["attn_lse"], cfg.n_heads, cfg.causal, cfg.attn_dropout, cfg.seed, attn_mask,
    ).view(n, 3 * d)  # fmt: skip
    g["b_qkv"] = _sum_rows(dqkv, p["b_qkv"])
    dy1 = torch.matmul(dqkv, p["w_qkv"])  # (N, d)
    dx, g["ln1_w"], g["ln1_b"], y1 = ops.layer_norm_bwd(
        dy1.contiguous(), x, m1, r1, ln1_w, ln1_b, dx1, policy != "none"
    )
    y1 = acts["ln1_out"] if policy == "none" else y1
    g["w_qkv"] = torch.matmul(dqkv.t(), y1)
    for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b"):
        if p[name] is None:
            g[name] = None
    return dx, g


def _dropout_grad(grad: Tensor, p: float, seed: int) -> Tensor:
    """Gradient through a residual branch's dropout: the same hash mask, replayed from the seed."""
    return ops.dropout_add(grad, None, p, seed) if p > 0.0 else grad


def _bias(b: Optional[Tensor], w: Tensor) -> Tensor:
    return b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)


class FusedBlockFunction(torch.autograd.Function):
    """x (B, T, d), attn_mask, cfg, *params (PARAM_NAMES order, None where absent) -> out (B, T, d)."""

    @staticmethod
    def forward(ctx, x, attn_mask, cfg: BlockConfig, *params):
        b, t, d = x.shape
        p = dict(zip(PARAM_NAMES, params))
        x2 = x.reshape(b * t, d)
        out, acts = block_forward(x2, (b, t), p, cfg, attn_mask)
        keeps = get_policy(cfg.policy).keeps
        ctx.save_for_backward(attn_mask, *params, *_flatten_saved(acts, keeps))
        ctx.cfg, ctx.shape, ctx.keeps = cfg, (b, t), keeps
        ctx.autocast = _AutocastState(x.device.type)
        return out.view(b, t, d)

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        attn_mask = saved[0]
        params = saved[1 : 1 + len(PARAM_NAMES)]
        p = dict(zip(PARAM_NAMES, params))
        acts = _unflatten_saved(saved[1 + len(PARAM_NAMES) :], ctx.keeps)
        cfg, (b, t) = ctx.cfg, ctx.shape
        d = acts["x"].shape[1]
        with ctx.autocast():
            if cfg.policy == "block":
                replay = attention_half(acts["x"], (b, t), p, cfg, attn_mask)
                replay.pop("ln1_out")  # LN1's backward emits it again when dW_qkv needs it
                replay.pop("ln1_stats")
                acts.update(replay)
            dx, g = block_backward(dout.reshape(b * t, d), acts, p, cfg, (b, t), attn_mask, ctx.autocast)
        grads = tuple(None if p[name] is None else g[name] for name in PARAM_NAMES)
        return (dx.view(b, t, d), None, None, *grads)
