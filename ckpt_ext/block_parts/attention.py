"""The attention segment: q/k/v projections (packed or three, GQA, Qwen3's q/k norm, RoPE), the attention core
(``gqa_attention_fwd/bwd``: masks, segment ids, causal, dropout on the probabilities) and the output projection with
its dropout and the residual add in the GEMM epilogue; and its backward down to the q/k/v projections' dZ.

Shapes: x, y1 (N, d) with N = B*T; q (N, h·dh), k, v (N, hk·dh); o (N, h·dh); lse (B, h, T) fp32.
Saved tensors (policies.py names) and their tensor counts: ``saves(spec, rope)``. ``qkv`` is (q|k|v,) packed without
RoPE, (q, k, v) otherwise (q, k after RoPE); with qk_norm the projections before the norm, beside qk_stats (the q/k
norms' rstd) and qk_rope (normalized, rotated q, k).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import AutocastState, sum_rows
from .dispatch import block_ops as _ops
from .lora_terms import input_grads, lora_add, lora_residual, weight_grads, with_input_grad
from .norm import norm_fwd


def saves(spec, rope: bool) -> dict[str, int]:
    """Tensor count of each name this segment can save (0: not in this form)."""
    qk = 2 if spec.qk_norm else 0
    n1 = 1 if spec.attn_norm else 0
    qkv = 3 if spec.qk_norm or rope or not spec.packed_qkv else 1
    return {"ln1_stats": spec.n_stats() * n1, "ln1_out": n1, "qkv": qkv, "qk_stats": qk, "qk_rope": qk, "attn_out": 1,
            "attn_lse": 1, "h1": 1, "x1": 1}  # fmt: skip


def _qkv_widths(cfg, d: int) -> list[int]:
    """Widths of q, k and v in the projection output (and row blocks of a packed q|k|v weight)."""
    dh = cfg.spec.dh(d)
    return [cfg.spec.n_heads * dh, cfg.spec.kv_heads() * dh, cfg.spec.kv_heads() * dh]


def _heads(t: Tensor, shape, dh: int) -> Tensor:
    """(N, heads·dh) or (B, T, heads, dh) -> a (B, T, heads, dh) view."""
    b, t_len = shape
    return t.view(b, t_len, -1, dh)


def _project(y1: Tensor, shape, p: dict, cfg, rope_cs) -> dict:
    """The q/k/v projections of the attention input y1 (N, d) (with q/k norm and RoPE): the tensors attention reads,
    and what they came from.

    Returns qkv (the saved form: (qkv,) packed without RoPE; (q, k, v) with q and k after RoPE; with qk_norm the
    projections before the norm), qk_stats and qk_rope (with qk_norm)."""
    d = y1.shape[1]
    dh = cfg.spec.dh(d)
    acts = {}
    if cfg.spec.packed_qkv:
        qkv = lora_add(F.linear(y1, p["w_qkv"], p["b_qkv"]), y1, p, cfg, "qkv")  # (N, (h + 2hk)·dh), one GEMM
        q, k, v = qkv.split_with_sizes(_qkv_widths(cfg, d), 1)
    else:
        q, k, v = (lora_add(F.linear(y1, p[f"w_{s}"], p[f"b_{s}"]), y1, p, cfg, s) for s in "qkv")  # (N, h·dh), ...
    if cfg.spec.qk_norm:
        acts["qkv"] = (q, k, v)
        q, k, acts["qk_stats"] = _qk_norm(q, k, p, cfg, dh)
    if rope_cs is not None:
        q, k = _ops.rope(_heads(q, shape, dh), _heads(k, shape, dh), rope_cs[0], rope_cs[1], False)
    if cfg.spec.qk_norm:
        acts["qk_rope"] = (_heads(q, shape, dh), _heads(k, shape, dh))
    elif cfg.spec.packed_qkv and rope_cs is None:
        acts["qkv"] = (qkv,)
    else:
        acts["qkv"] = (q, k, v if rope_cs is None or not cfg.spec.packed_qkv else v.contiguous())
    return acts


def _qk_norm(q: Tensor, k: Tensor, p: dict, cfg, dh: int):
    """Qwen3's RMSNorm over head_dim of every q and k head: (N, h·dh), (N, hk·dh) -> same shapes, rstds."""
    n = q.shape[0]
    qn, rq = _ops.rms_norm_fwd(q.reshape(-1, dh), p["q_norm_w"], cfg.spec.eps)  # (N·h, dh), (N·h,)
    kn, rk = _ops.rms_norm_fwd(k.reshape(-1, dh), p["k_norm_w"], cfg.spec.eps)
    return qn.view(n, -1), kn.view(n, -1), (rq, rk)


def attention_inputs(acts: dict, p: dict, cfg, shape, d: int, rope_cs, ac: AutocastState):
    """q (B, T, h, dh), k, v (B, T, hk, dh) as attention reads them, from the saved (or replayed) tensors."""
    dh = cfg.spec.dh(d)
    if cfg.spec.qk_norm:
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


def attention_half(x: Tensor, shape, p: dict, cfg, attn_mask, rope_cs=None, attn=None,
                   segment_ids=None) -> dict:  # fmt: skip
    """x (N, d) -> the attention half's tensors (policies.py names). ``attn`` = (attn_out, attn_lse) kept by
    block_keep_attn: then the attention core is not run again. segment_ids (B, T): see ops/attention.py.

    pre-LN: y1 = norm1(x) (x without attn_norm) feeds q/k/v and x1 = x + drop(o Wo + bo). post-LN: x feeds q/k/v,
    h1 = x + drop(o Wo + bo) and x1 = norm1(h1)."""
    ac = AutocastState(x.device.type)
    d = x.shape[1]
    post = cfg.spec.placement == "post"
    if post or not cfg.spec.attn_norm:
        y1, acts = x, {}
    else:
        y1, s1 = norm_fwd(x, p, "ln1", cfg)
        acts = {"ln1_out": y1, "ln1_stats": s1}
    acts.update(_project(y1, shape, p, cfg, rope_cs))
    if attn is None:
        q, k, v = attention_inputs(acts, p, cfg, shape, d, rope_cs, ac)
        o, lse = _ops.gqa_attention_fwd(q, k, v, cfg.spec.causal, cfg.attn_dropout, cfg.seed, attn_mask,
                                       cfg.spec.softmax_scale(d), segment_ids, cfg.spec.window)  # fmt: skip
        attn = (o.view(x.shape[0], -1), lse)  # (N, h·dh), (B, h, T)
    acts["attn_out"], acts["attn_lse"] = attn
    residual = lora_residual(x, acts["attn_out"], p, cfg, "proj", cfg.seed + 1)
    h = _ops.linear_dropout_add(
        ac.mm(acts["attn_out"]), ac.mm(p["w_proj"]), ac.mm(p["b_proj"]), residual, cfg.dropout, cfg.seed + 1
    )  # (N, d)
    if post:
        acts["h1"] = h
        acts["x1"], acts["ln1_stats"] = norm_fwd(h, p, "ln1", cfg)
    else:
        acts["x1"] = h
    return acts


def replay_key(spec) -> str:
    """The attention half's output the MLP backward starts from: without it saved, backward replays the half."""
    return "h1" if spec.placement == "post" else "x1"


def attention_backward(dpr: Tensor, acts: dict, p: dict, cfg, shape, attn_mask, rope_cs, ac, g,
                        segment_ids=None, want=frozenset()):  # fmt: skip
    """From the o_proj input gradient to [(weight, name, dZ (N, width))] of the q, k, v projections (packed: one).
    dW_o and the q/k norm weight grads only where ``want`` has them."""
    b, t = shape
    d = acts["x"].shape[1]
    dh = cfg.spec.dh(d)
    dprm = ac.mm(dpr)
    if "w_proj" in want:
        g["w_proj"] = torch.matmul(dprm.t(), acts["attn_out"])
    extra, pending = input_grads([("proj", dprm)], p, cfg)
    do = with_input_grad(torch.matmul(dprm, p["w_proj"]), extra)  # (N, h·dh)
    weight_grads(pending, acts["attn_out"], p, cfg, g, want)
    del dprm
    q, k, v = attention_inputs(acts, p, cfg, shape, d, rope_cs, ac)
    o = _heads(acts["attn_out"], shape, dh)
    dq, dk, dv = _ops.gqa_attention_bwd(_heads(do, shape, dh).contiguous(), q, k, v, o, acts["attn_lse"],
                                       cfg.spec.causal, cfg.attn_dropout, cfg.seed, attn_mask,
                                       cfg.spec.softmax_scale(d), segment_ids, cfg.spec.window)  # fmt: skip
    del q, k, v, do
    if rope_cs is not None:
        dq, dk = _ops.rope(dq, dk, rope_cs[0], rope_cs[1], True)  # the rotation's adjoint
    n = b * t
    dq, dk, dv = dq.reshape(n, -1), dk.reshape(n, -1), dv.reshape(n, -1)
    if cfg.spec.qk_norm:  # the op reduces dγ anyway (it has no switch); a frozen norm weight just drops it
        q_pre, k_pre, _ = acts["qkv"]
        rq, rk = acts["qk_stats"]
        dq, dwq, _ = _ops.rms_norm_bwd(dq.reshape(-1, dh), q_pre.reshape(-1, dh), rq, p["q_norm_w"], None, False)
        dk, dwk, _ = _ops.rms_norm_bwd(dk.reshape(-1, dh), k_pre.reshape(-1, dh), rk, p["k_norm_w"], None, False)
        g.update((name, dw) for name, dw in (("q_norm_w", dwq), ("k_norm_w", dwk)) if name in want)
        dq, dk = dq.view(n, -1), dk.view(n, -1)
    if cfg.spec.packed_qkv:  # one (N, q + 2 kv width) gradient in w_qkv's row order: one GEMM each for dY1 and dW_qkv
        return [(p["w_qkv"], "qkv", torch.cat((dq, dk, dv), dim=1))]
    return [(p[f"w_{s}"], s, dz) for s, dz in zip("qkv", (dq, dk, dv))]


def projection_wgrads(pairs, y: Optional[Tensor], p: dict, g: dict, want) -> None:
    """dW = dZᵀ @ y and db = Σ dZ for the q, k, v projections (or the packed q|k|v one), where ``want`` has them."""
    for _, s, dz in pairs:
        if f"w_{s}" in want:
            g[f"w_{s}"] = torch.matmul(dz.t(), y)
        if f"b_{s}" in want:
            g[f"b_{s}"] = sum_rows(dz, p[f"b_{s}"])
