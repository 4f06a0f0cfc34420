"""The block as one autograd.Function over ``ckpt_ext::*`` ops: its segments (block_parts/) in order, the saved set
from ``save_layout``, and a hand-written backward that follows from what was saved.

Its form is a ``BlockSpec`` (spec.py): LayerNorm or RMSNorm, GELU / GELU-tanh / SwiGLU / GeGLU MLP, packed or separate
q/k/v, RoPE from the model's (cos, sin), GQA, Qwen3's per-head q/k norm, LoRA on any linear. The segments are
block_parts/norm.py, attention.py and mlp.py; this file runs them and owns the autograd.Function.
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
Post-LN (``placement="post"``, BERT): q/k/v read x, h1 = x + drop(o Wp + bp), x1 = norm1(h1) feeds the MLP and its
residual, h2 = x1 + drop(a W2 + b2), out = norm2(h2); backward starts with norm2's backward from h2, and norm1 plays
the MLP-input norm's part above (the same recompute kernels, reading h1 and norm1's statistics).
``block`` first replays the attention half's forward from x and the saved statistics; ``block_keep_attn`` replays it
without the attention core (it kept o and lse). What is saved is ``save_layout.save_layout(spec, policy, rope)``
(the policy table × each segment's tensor counts), read here and by compiled.py. Recompute and backward run under
the forward's autocast state (disabled included: an outer autocast around backward does not leak in). Frozen weights
(ctx.needs_input_grad False) skip their dW GEMM and db reduction and get None; without dx needed and with norm1
frozen, the dY1 GEMM is skipped too. Double backward (create_graph=True) raises instead of returning wrong
second-order gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backend, save_layout
from .block_parts.attention import attention_backward, attention_half, projection_wgrads, replay_key
from .block_parts.common import AutocastState, dropout_grad, input_grad, sum_rows, wanted
from .block_parts.dispatch import EagerFastPath
from .block_parts.lora_terms import input_grads, lora_wanted, weight_grads, with_input_grad
from .block_parts.mlp import ffn_half, mlp_backward
from .block_parts.mlp import input_norm as mlp_input_norm
from .block_parts.norm import norm_bwd, norm_bwd_from_output, norm_fwd
from .spec import ALL_PARAM_NAMES, BlockConfig, BlockSpec, is_numpy_bool

__all__ = ["ALL_PARAM_NAMES", "AutocastState", "BlockConfig", "BlockSpec", "EagerFastPath", "FusedBlockFunction",
           "attention_half", "block_backward", "block_forward", "check_config", "ffn_half", "is_numpy_bool",
           "param_names"]  # fmt: skip


def param_names(cfg: BlockConfig) -> tuple[str, ...]:
    """The parameter names a configuration uses (its spec's list)."""
    return cfg.spec.param_names()


def check_config(cfg: BlockConfig) -> None:
    cfg.check()


def block_forward(x: Tensor, shape, params: dict, cfg: BlockConfig, attn_mask, rope_cs=None,
                  segment_ids=None) -> tuple[Tensor, dict]:  # fmt: skip
    acts = attention_half(x, shape, params, cfg, attn_mask, rope_cs, segment_ids=segment_ids)
    out, ffn_acts = ffn_half(acts["x1"], params, cfg)
    acts.update(ffn_acts)
    acts["x"] = x
    acts["out"] = out
    return out, acts


def block_backward(dout: Tensor, acts: dict, p: dict, cfg: BlockConfig, shape, attn_mask, ac: AutocastState,
                   rope_cs=None, segment_ids=None, needs=None):  # fmt: skip
    """dout (N, d) -> dx (N, d) and a dict of parameter grads. ``acts`` holds the policy's saved tensors.

    ``needs``: None (every gradient), or the names wanted: parameter names, and "x" for dx. A frozen weight's dW GEMM
    and a frozen bias's reduction are skipped (norm weights: the norm backward op reduces them anyway; dropped), and
    it has no entry in the dict. Without "x", and with both norm1 weights frozen, dx (None) and its Σ dZ W_{q,k,v}
    GEMM are skipped too (pre-LN).

    pre-LN: dout reaches the MLP's residual sum directly; norm2's backward adds it to x1's gradient (dresidual).
    post-LN: norm2's backward first (dh2, from h2); the MLP's input x1 = norm1(h1) is also its residual, so norm1's
    backward takes dy2 + dh2 and its result dh1 is the attention half's residual gradient."""
    want = wanted(p, needs)
    post = cfg.spec.placement == "post"
    x = acts["x"]
    g: dict = {}
    dres = dout
    if post and "h2" in acts:
        dres = norm_bwd(dout, acts["h2"], acts["ln2_stats"], p, "ln2", cfg, None, False, g, want)[0]
    elif post:  # x̂2 rebuilt from the block's output
        dres = norm_bwd_from_output(dout, acts["out"], acts["ln2_stats"], p, "ln2", cfg, g, want)

    # ---- MLP half (a gradient that feeds two matmuls is cast to the autocast dtype once: dfm)
    df = dropout_grad(dres, cfg.dropout, cfg.seed + 2)  # (N, d)
    if "b_fc2" in want:
        g["b_fc2"] = sum_rows(df, p["b_fc2"])
    dfm = ac.mm(df)
    mlp = mlp_backward(dfm, acts, p, cfg, ac, g, want)
    del dfm, df
    extra, lora_mlp = input_grads([(w[2:], dz) for w, _, dz in mlp], p, cfg)
    dy2 = with_input_grad(input_grad([(dz, p[w]) for w, _, dz in mlp]), extra)  # (N, d)
    x_key, stats_key, which, out_key = mlp_input_norm(acts, cfg.spec)
    emit_y2 = out_key not in acts and (any(w in want for w, _, _ in mlp) or lora_wanted(lora_mlp, want))
    if post:  # x1 = norm1(h1) feeds the MLP and its residual: norm1's backward takes both gradients
        dres, y2 = norm_bwd(dy2 + dres, acts[x_key], acts[stats_key], p, which, cfg, None, emit_y2, g, want)
    else:
        dres, y2 = norm_bwd(dy2, acts[x_key], acts[stats_key], p, which, cfg, dres, emit_y2, g, want)
    y2 = acts.get(out_key, y2)
    for w, bname, dz in mlp:
        if w in want:
            g[w] = torch.matmul(dz.t(), y2)
        if bname in want:
            g[bname] = sum_rows(dz, p[bname])
    weight_grads(lora_mlp, y2, p, cfg, g, want)
    del mlp, dy2, y2

    # ---- attention half (dres: the gradient of its residual sum, x1 pre-LN / h1 post-LN)
    dpr = dropout_grad(dres, cfg.dropout, cfg.seed + 1)  # (N, d)
    if "b_proj" in want:
        g["b_proj"] = sum_rows(dpr, p["b_proj"])
    proj = attention_backward(dpr, acts, p, cfg, shape, attn_mask, rope_cs, ac, g, segment_ids, want)
    del dpr
    extra, lora_qkv = input_grads([(s, dz) for _, s, dz in proj], p, cfg)
    need_y1 = any(f"w_{s}" in want for _, s, _ in proj) or lora_wanted(lora_qkv, want)
    if post or not cfg.spec.attn_norm:  # q/k/v read x itself
        dx = with_input_grad(input_grad([(dz, w) for w, _, dz in proj]), extra) + dres  # (N, d)
        y1 = x
    elif needs is None or "x" in needs or "ln1_w" in want or "ln1_b" in want:
        dy1 = with_input_grad(input_grad([(dz, w) for w, _, dz in proj]), extra)  # (N, d)
        dx, y1 = norm_bwd(dy1, x, acts["ln1_stats"], p, "ln1", cfg, dres, need_y1 and "ln1_out" not in acts, g, want)
    else:  # nothing below the q/k/v projections needs a gradient
        dx = None
        y1 = norm_fwd(x, p, "ln1", cfg)[0] if need_y1 and "ln1_out" not in acts else None
    y1 = acts.get("ln1_out", y1)
    projection_wgrads(proj, y1, p, g, want)
    weight_grads(lora_qkv, y1, p, cfg, g, want)
    return dx, g


# ------------------------------------------------------------------------------------------ autograd.Function
def forward_saved(x: Tensor, shape, p: dict, cfg: BlockConfig, attn_mask, rope_cs, segment_ids):
    """x (N, d) -> out (N, d), [x, *the saved tensors] and their layout (x first, then save_layout's)."""
    out, acts = block_forward(x, shape, p, cfg, attn_mask, rope_cs, segment_ids)
    layout = (("x", 1), *save_layout.save_layout(cfg.spec, cfg.policy, rope_cs is not None, cfg.ln2_from_out))
    return out, save_layout.flatten(acts, layout), layout


def backward_from_saved(dout: Tensor, flat, layout, p: dict, cfg: BlockConfig, shape, attn_mask, rope_cs,
                        segment_ids, ac: AutocastState, needs=None):  # fmt: skip
    """dout (N, d) and forward_saved's kept tensors -> dx (N, d), parameter grads by name (``needs``: see
    block_backward). Without x1 saved (block, block_keep_attn) the attention half is replayed first, without its core
    when o and lse were kept."""
    acts = save_layout.unflatten(flat, layout)
    if replay_key(cfg.spec) not in acts:
        kept = (acts["attn_out"], acts["attn_lse"]) if "attn_lse" in acts else None
        replay = attention_half(acts["x"], shape, p, cfg, attn_mask, rope_cs, kept, segment_ids)
        replay.pop("ln1_out", None)  # pre-LN: norm1's backward emits it again when dW_qkv needs it
        acts.update({k: v for k, v in replay.items() if k not in acts})
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
        ctx.autocast = AutocastState(x.device.type)
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
