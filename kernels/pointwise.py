"""Elementwise GELU kernels over flat contiguous tensors: forward with an optional bias, and the backward from u.

bias_gelu: y[i] = gelu(x[i] + bias[i % H])          x, y (numel,) viewed flat; bias (H,)
gelu_bwd:  du[i] = da[i] * gelu'(u[i])               da, u, du (numel,)
One program per BLOCK elements; fp32 math (helpers in gelu_math), stores in the output dtype.
"""

import triton
import triton.language as tl

from .gelu_math import gelu_and_grad


@triton.jit
def bias_gelu_kernel(
    X,  # (numel,) contiguous, last dim H: pre-activation without bias
    BIAS,  # (H,) bias (read only when HAS_BIAS)
    Y,  # (numel,) contiguous, x.dtype: gelu(x + bias)
    numel,
    H,
    HAS_BIAS: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(BIAS + offs % H, mask=mask, other=0.0).to(tl.float32)
    act, _ = gelu_and_grad(u, APPROX_TANH)
    tl.store(Y + offs, act.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def gelu_bwd_kernel(
    DA,  # (numel,) contiguous: gradient of gelu's output
    U,  # (numel,) contiguous: pre-activation
    DU,  # (numel,) contiguous, u.dtype: da * gelu'(u)
    numel,
    APPROX_TANH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(DA + offs, mask=mask, other=0.0).to(tl.float32)
    _, grad = gelu_and_grad(u, APPROX_TANH)
    tl.store(DU + offs, (da * grad).to(DU.dtype.element_ty), mask=mask)
