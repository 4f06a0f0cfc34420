"""Launchers: the ``ckpt_ext::*`` graph ops' signatures on top of the Triton kernels (backend "triton").

``IMPLS`` maps op name -> callable with the graph op's exact signature and output dtypes (see ckpt_ext.reference).
Each launcher views its inputs as 2-D or flat, copies only what a kernel cannot read through strides (a non-unit
column stride on activations; weights are always read through their strides), allocates fresh outputs (never
aliases an input), picks the grid and launches. Inputs the kernels do not cover (float64, empty tensors, more than
2³² dropout elements) run the reference math, so every call returns the reference's result.
The Llama-family ops (RMSNorm, RoPE) are in llama_launchers.py, SwiGLU / GeGLU in gated_launchers.py (the backend
merges the tables); the norm backwards and ffn_recompute reduce their fp32 partials with a second small launch
(launch_utils.column_sums).
Importing this module imports triton; the backend imports it only when asked for a kernel (backends/triton).
"""

from __future__ import annotations

import functools

import torch

from ... import reference
from ...kernels.act_linear_wgrad import act_linear_wgrad_autotuned
from ...kernels.dropout import dropout_add_kernel
from ...kernels.ffn_pointwise import linear_gelu_bwd_autotuned
from ...kernels.ffn_recompute import ffn_recompute_autotuned
from ...kernels.layer_norm import layer_norm_bwd_kernel, layer_norm_fwd_kernel
from ...kernels.linear_dropout_add import linear_dropout_add_autotuned
from ...kernels.linear_gelu import linear_bias_gelu_autotuned
from ...kernels.pointwise import bias_gelu_kernel, gelu_bwd_kernel
from .launch_utils import (
    KERNEL_DTYPES,
    POINTWISE_BLOCK,
    bwd_programs,
    cdiv,
    column_sums,
    covered,
    matmul_grid,
    next_pow2,
    row_warps,
    rows,
    upcast,
)


# ------------------------------------------------------------------------------------------------- LayerNorm
def layer_norm_fwd(x, weight, bias, eps):
    if not covered(x, weight, bias):
        return reference.layer_norm_fwd(x, weight, bias, eps)
    x = rows(x)
    n, d = x.shape
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    mean = torch.empty((n,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((n,), dtype=torch.float32, device=x.device)
    block_d = next_pow2(d)
    layer_norm_fwd_kernel[(n,)](x, weight, bias, y, mean, rstd, x.stride(0), d, eps, BLOCK_D=block_d,
                                num_warps=row_warps(block_d))  # fmt: skip
    return y, mean, rstd


def layer_norm_bwd(dy, x, mean, rstd, weight, bias, dresidual, emit_y):
    if not covered(dy, x, weight, bias, dresidual) or mean.dtype != torch.float32:
        return reference.layer_norm_bwd(dy, x, mean, rstd, weight, bias, dresidual, emit_y)
    x = rows(x)
    dy = dy.contiguous()
    dres = dresidual.contiguous() if dresidual is not None else None
    n, d = x.shape
    dx = torch.empty((n, d), dtype=x.dtype, device=x.device)
    y = torch.empty((n, d), dtype=x.dtype, device=x.device) if emit_y else x.new_empty((0,))
    programs = bwd_programs(n, x.device)
    dw_part = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    db_part = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    block_d = next_pow2(d)
    layer_norm_bwd_kernel[(programs,)](
        dy, x, mean.contiguous(), rstd.contiguous(), weight, bias, dres if dres is not None else dy, dx,
        y if emit_y else dx, dw_part, db_part, n, d, x.stride(0), cdiv(n, programs),
        HAS_DRES=dres is not None, EMIT_Y=emit_y, BLOCK_D=block_d, num_warps=row_warps(block_d),
    )  # fmt: skip
    dw, db = column_sums(dw_part, weight.dtype, db_part, bias.dtype)
    return dx, dw, db, y


# ------------------------------------------------------------------------------------------------------ GELU
def _gelu_launcher(launch):
    """A GELU-form launcher whose tensors are every argument before ``approximate`` (the last): the form is checked,
    and tensors the kernels do not cover run the reference op of the same name."""

    @functools.wraps(launch)
    def call(*args):
        reference._check_approximate(args[-1])
        if not covered(*args[:-1]):
            return getattr(reference, launch.__name__)(*args)
        return launch(*args)

    return call


@_gelu_launcher
def bias_gelu(x, bias, approximate):
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    numel = xc.numel()
    bias_gelu_kernel[(cdiv(numel, POINTWISE_BLOCK),)](
        xc, bias if bias is not None else xc, y, numel, x.shape[-1], HAS_BIAS=bias is not None,
        APPROX_TANH=approximate == "tanh", BLOCK=POINTWISE_BLOCK,
    )  # fmt: skip
    return y


@_gelu_launcher
def gelu_bwd(da, u, approximate):
    da, uc = da.contiguous(), u.contiguous()
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    numel = uc.numel()
    gelu_bwd_kernel[(cdiv(numel, POINTWISE_BLOCK),)](
        da, uc, du, numel, APPROX_TANH=approximate == "tanh", BLOCK=POINTWISE_BLOCK
    )
    return du


# --------------------------------------------------------------------------------------------------- dropout
def _as_int32(v: int) -> int:
    return v - (1 << 32) if v >= (1 << 31) else v


def dropout_add(x, residual, p, seed):
    out_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    if not covered(x, residual) or out_dtype not in KERNEL_DTYPES or x.numel() >= (1 << 32):
        return reference.dropout_add(x, residual, p, seed)
    xc = x.contiguous()
    res = residual.contiguous() if residual is not None else None
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    numel = xc.numel()
    dropout_add_kernel[(cdiv(numel, POINTWISE_BLOCK),)](
        xc, res if res is not None else xc, out, numel, _as_int32(reference.seed_key(seed)),
        reference.dropout_threshold(p), 1.0 / (1.0 - p), HAS_RES=res is not None, APPLY_DROPOUT=p > 0.0,
        BLOCK=POINTWISE_BLOCK,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- fused FFN
def ffn_recompute(x1, mean, rstd, ln_weight, ln_bias, w1, b1, dy, w2, approximate):
    reference._check_approximate(approximate)
    if not covered(x1, ln_weight, ln_bias, w1, b1, dy, w2) or mean.dtype != torch.float32:
        return reference.ffn_recompute(x1, mean, rstd, ln_weight, ln_bias, w1, b1, dy, w2, approximate)
    x1, dy = rows(x1), rows(dy)
    m, k = x1.shape
    n = w1.shape[0]
    (block_m,) = {c.kwargs["BLOCK_M"] for c in ffn_recompute_autotuned.configs}
    a = torch.empty((m, n), dtype=dy.dtype, device=dy.device)
    du = torch.empty((m, n), dtype=dy.dtype, device=dy.device)
    db1_part = torch.empty((cdiv(m, block_m), n), dtype=torch.float32, device=dy.device)
    ffn_recompute_autotuned[matmul_grid(m, n)](
        x1, mean.contiguous(), rstd.contiguous(), ln_weight, ln_bias, w1, b1, dy, w2, a, du, db1_part, m, n, k,
        x1.stride(0), w1.stride(0), w1.stride(1), dy.stride(0), w2.stride(0), w2.stride(1),
        APPROX_TANH=approximate == "tanh", UPCAST=upcast(w1, dy, w2),
    )  # fmt: skip
    return a, du, column_sums(db1_part, torch.float32)


@_gelu_launcher
def linear_bias_gelu(x, w, b, approximate):
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    linear_bias_gelu_autotuned[matmul_grid(m, n)](
        x, w, b if b is not None else w, out, m, n, k, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        HAS_BIAS=b is not None, APPROX_TANH=approximate == "tanh", UPCAST=upcast(x, w),
    )  # fmt: skip
    return out


def linear_dropout_add(x, w, b, residual, p, seed):
    m, k = x.shape
    n = w.shape[0]
    if not covered(x, w, b, residual) or m * n >= (1 << 32):
        return reference.linear_dropout_add(x, w, b, residual, p, seed)
    residual = rows(residual)
    out = torch.empty((m, n), dtype=residual.dtype, device=residual.device)
    linear_dropout_add_autotuned[matmul_grid(m, n)](
        x, w, b if b is not None else w, residual, out, m, n, k, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        residual.stride(0), _as_int32(reference.seed_key(seed)), reference.dropout_threshold(p), 1.0 / (1.0 - p),
        HAS_BIAS=b is not None, APPLY_DROPOUT=p > 0.0, UPCAST=upcast(x, w),
    )  # fmt: skip
    return out


@_gelu_launcher
def linear_gelu_bwd(dy, w2, u, approximate):
    u = rows(u)
    m, k = dy.shape
    n = w2.shape[1]
    du = torch.empty((m, n), dtype=u.dtype, device=u.device)
    linear_gelu_bwd_autotuned[matmul_grid(m, n)](
        dy, w2, u, du, m, n, k, dy.stride(0), dy.stride(1), w2.stride(0), w2.stride(1), u.stride(0),
        APPROX_TANH=approximate == "tanh", UPCAST=upcast(dy, w2),
    )  # fmt: skip
    return du


@_gelu_launcher
def gelu_linear_wgrad(dy, u, approximate):
    u = rows(u)
    n_rows, m = dy.shape
    n = u.shape[1]
    dw = torch.empty((m, n), dtype=dy.dtype, device=dy.device)
    act_linear_wgrad_autotuned[matmul_grid(m, n)](
        dy, u, u, dw, m, n, n_rows, dy.stride(0), dy.stride(1), u.stride(0), u.stride(0),
        ACT="gelu_tanh" if approximate == "tanh" else "gelu", UPCAST=upcast(dy, u),
    )  # fmt: skip
    return dw


IMPLS = {
    "layer_norm_fwd": layer_norm_fwd,
    "layer_norm_bwd": layer_norm_bwd,
    "bias_gelu": bias_gelu,
    "gelu_bwd": gelu_bwd,
    "dropout_add": dropout_add,
    "ffn_recompute": ffn_recompute,
    "linear_bias_gelu": linear_bias_gelu,
    "linear_dropout_add": linear_dropout_add,
    "linear_gelu_bwd": linear_gelu_bwd,
    "gelu_linear_wgrad": gelu_linear_wgrad,
}
