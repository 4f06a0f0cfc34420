"""Launchers of the Llama-family graph ops (RMSNorm, RoPE and the fused SwiGLU matmuls; the pointwise SwiGLU is in
gated_launchers.py); the backend merges IMPLS with launchers.IMPLS. Same rules as launchers.py: the graph op's exact
signature and output dtypes (the op contract, ckpt_ext.reference), inputs read through their strides where the kernel
can, fresh contiguous outputs, and the reference math for what the kernels do not cover (float64, empty tensors, shapes
the reference rejects).

rms_norm_fwd         one launch: y, rstd
rms_norm_bwd         two launches: the row kernel (dx, y, fp32 dweight partials) and column_sums (dweight)
rope                 one launch rotates q and k (grid = B·T positions)
linear_swiglu, swiglu_linear_bwd, swiglu_linear_wgrad, swiglu_ffn_recompute   one GEMM launch each
"""

from __future__ import annotations

import torch

from ... import reference
from ...kernels.act_linear_wgrad import act_linear_wgrad_autotuned
from ...kernels.linear_swiglu import linear_swiglu_autotuned
from ...kernels.rms_norm import rms_norm_bwd_kernel, rms_norm_fwd_kernel
from ...kernels.rope import rope_kernel
from ...kernels.swiglu_ffn_recompute import swiglu_ffn_recompute_autotuned
from ...kernels.swiglu_pointwise import swiglu_linear_bwd_autotuned
from .launch_utils import bwd_programs, cdiv, column_sums, covered, matmul_grid, next_pow2, row_warps, rows, upcast

ROPE_TILE = 2048  # elements of one (heads, dh/2) tile of the RoPE kernel


# ---------------------------------------------------------------------------------------------------- RMSNorm
def rms_norm_fwd(x, weight, eps):
    if not covered(x, weight) or x.dim() != 2 or weight.shape != (x.shape[1],):
        return reference.rms_norm_fwd(x, weight, eps)
    x = rows(x)
    n, d = x.shape
    y = torch.empty((n, d), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty((n,), dtype=torch.float32, device=x.device)
    block_d = next_pow2(d)
    rms_norm_fwd_kernel[(n,)](x, weight, y, rstd, x.stride(0), d, eps, ROUND_N=x.dtype != torch.float32,
                              BLOCK_D=block_d, num_warps=row_warps(block_d))  # fmt: skip
    return y, rstd


def rms_norm_bwd(dy, x, rstd, weight, dresidual, emit_y):
    if (
        not covered(dy, x, rstd, weight, dresidual)
        or rstd.dtype != torch.float32
        or x.dim() != 2
        or dy.shape != x.shape
        or rstd.shape != (x.shape[0],)
        or weight.shape != (x.shape[1],)
        or (dresidual is not None and dresidual.shape != x.shape)
    ):
        return reference.rms_norm_bwd(dy, x, rstd, weight, dresidual, emit_y)
    x, dy = rows(x), rows(dy)
    dres = rows(dresidual) if dresidual is not None else None
    n, d = x.shape
    dx = torch.empty((n, d), dtype=x.dtype, device=x.device)
    y_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((n, d), dtype=y_dtype, device=x.device) if emit_y else x.new_empty((0,))
    programs = bwd_programs(n, x.device)
    dw_part = torch.empty((programs, d), dtype=torch.float32, device=x.device)  # (P, d)
    block_d = next_pow2(d)
    rms_norm_bwd_kernel[(programs,)](
        dy, x, rstd.contiguous(), weight, dres if dres is not None else dy, dx, y if emit_y else dx, dw_part, n, d,
        dy.stride(0), x.stride(0), dres.stride(0) if dres is not None else 0, cdiv(n, programs),
        HAS_DRES=dres is not None, EMIT_Y=emit_y, ROUND_N=x.dtype != torch.float32, BLOCK_D=block_d,
        num_warps=row_warps(block_d),
    )  # fmt: skip
    return dx, column_sums(dw_part, weight.dtype), y


# ------------------------------------------------------------------------------------------------------- RoPE
def _rope_shapes_ok(q, k, cos, sin) -> bool:
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    b, t, _, dh = q.shape
    return (k.shape[0], k.shape[1], k.shape[3]) == (b, t, dh) and cos.shape[0] in (1, b) and cos.shape[1:] == (t, dh)


def rope(q, k, cos, sin, inverse):
    if not covered(q, k, cos, sin) or not _rope_shapes_ok(q, k, cos, sin) or q.shape[3] % 2:
        return reference.rope(q, k, cos, sin, inverse)
    q = q if q.stride(3) == 1 else q.contiguous()
    k = k if k.stride(3) == 1 else k.contiguous()
    if cos.stride(2) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    b, t, hq, dh = q.shape
    hk = k.shape[2]
    q_out = torch.empty((b, t, hq, dh), dtype=q.dtype, device=q.device)
    k_out = torch.empty((b, t, hk, dh), dtype=k.dtype, device=k.device)
    block_half = next_pow2(dh // 2)
    block_h = max(1, min(next_pow2(max(hq, hk)), ROPE_TILE // block_half))
    rope_kernel[(b * t,)](
        q, k, cos, sin, q_out, k_out, t, hq, hk, dh // 2, *q.stride()[:3], *k.stride()[:3],
        0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), INVERSE=inverse, BLOCK_H=block_h,
        BLOCK_HALF=block_half,
    )  # fmt: skip
    return q_out, k_out


# ------------------------------------------------------------------------------------------ fused SwiGLU GEMMs
def linear_swiglu(x, w_gate, b_gate, w_up, b_up):
    if not covered(x, w_gate, b_gate, w_up, b_up) or x.dim() != 2 or w_gate.shape != w_up.shape:
        return reference.linear_swiglu(x, w_gate, b_gate, w_up, b_up)
    m, k = x.shape
    n = w_gate.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    linear_swiglu_autotuned[matmul_grid(m, n)](
        x, w_gate, b_gate if b_gate is not None else w_gate, w_up, b_up if b_up is not None else w_up, out, m, n, k,
        x.stride(0), x.stride(1), w_gate.stride(0), w_gate.stride(1), w_up.stride(0), w_up.stride(1),
        HAS_BG=b_gate is not None, HAS_BU=b_up is not None, UPCAST=upcast(x, w_gate, w_up),
    )  # fmt: skip
    return out


def swiglu_linear_bwd(dy, w_down, g, u):
    if not covered(dy, w_down, g, u) or g.dim() != 2 or u.shape != g.shape or dy.shape[0] != g.shape[0]:
        return reference.swiglu_linear_bwd(dy, w_down, g, u)
    g, u = rows(g), rows(u)
    m, k = dy.shape
    n = w_down.shape[1]
    dg = torch.empty((m, n), dtype=g.dtype, device=g.device)
    du = torch.empty((m, n), dtype=u.dtype, device=u.device)
    swiglu_linear_bwd_autotuned[matmul_grid(m, n)](
        dy, w_down, g, u, dg, du, m, n, k, dy.stride(0), dy.stride(1), w_down.stride(0), w_down.stride(1),
        g.stride(0), u.stride(0), UPCAST=upcast(dy, w_down),
    )  # fmt: skip
    return dg, du


def swiglu_linear_wgrad(dy, g, u):
    if not covered(dy, g, u) or g.dim() != 2 or u.shape != g.shape or dy.shape[0] != g.shape[0]:
        return reference.swiglu_linear_wgrad(dy, g, u)
    g, u = rows(g), rows(u)
    n_rows, m = dy.shape
    n = g.shape[1]
    dw = torch.empty((m, n), dtype=dy.dtype, device=dy.device)
    act_linear_wgrad_autotuned[matmul_grid(m, n)](
        dy, g, u, dw, m, n, n_rows, dy.stride(0), dy.stride(1), g.stride(0), u.stride(0), ACT="swiglu",
        UPCAST=upcast(dy, g, u),
    )  # fmt: skip
    return dw


def swiglu_ffn_recompute(x1, rstd, norm_weight, w_gate, b_gate, w_up, b_up, dy, w_down):
    if (
        not covered(x1, rstd, norm_weight, w_gate, b_gate, w_up, b_up, dy, w_down)
        or rstd.dtype != torch.float32
        or x1.dim() != 2
        or dy.shape != x1.shape
        or w_gate.shape != w_up.shape
    ):
        return reference.swiglu_ffn_recompute(x1, rstd, norm_weight, w_gate, b_gate, w_up, b_up, dy, w_down)
    x1, dy = rows(x1), rows(dy)
    m, k = x1.shape
    n = w_gate.shape[0]
    h, dg, du = (torch.empty((m, n), dtype=dy.dtype, device=dy.device) for _ in range(3))
    swiglu_ffn_recompute_autotuned[matmul_grid(m, n)](
        x1, rstd.contiguous(), norm_weight, w_gate, b_gate if b_gate is not None else w_gate, w_up,
        b_up if b_up is not None else w_up, dy, w_down, h, dg, du, m, n, k, x1.stride(0), w_gate.stride(0),
        w_gate.stride(1), w_up.stride(0), w_up.stride(1), dy.stride(0), w_down.stride(0), w_down.stride(1),
        HAS_BG=b_gate is not None, HAS_BU=b_up is not None, ROUND_N=x1.dtype != torch.float32,
        ROUND_Y=torch.promote_types(x1.dtype, norm_weight.dtype) != torch.float32,
        UPCAST=upcast(w_gate, w_up, dy, w_down),
    )  # fmt: skip
    return h, dg, du


IMPLS = {
    "rms_norm_fwd": rms_norm_fwd,
    "rms_norm_bwd": rms_norm_bwd,
    "rope": rope,
    "linear_swiglu": linear_swiglu,
    "swiglu_linear_bwd": swiglu_linear_bwd,
    "swiglu_linear_wgrad": swiglu_linear_wgrad,
    "swiglu_ffn_recompute": swiglu_ffn_recompute,
}
