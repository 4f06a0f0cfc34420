"""Elementwise SwiGLU kernels over (N, F) rows (the none policy's pointwise ops; the fused GEMMs use swiglu_math).

swiglu_fwd: h = silu(g) · u                              → g.dtype
swiglu_bwd: dg = dh · u · silu'(g), du = dh · silu(g)    → g.dtype, u.dtype
g, u, dh (N, F) each with its own row stride and unit column stride (a strided view costs no copy); outputs
contiguous. Grid (N, cdiv(F, BLOCK)): one program per BLOCK columns of one row; fp32 math, stores in the output dtype.
"""

import triton
import triton.language as tl

from .swiglu_math import swiglu, swiglu_grads


@triton.jit
def swiglu_fwd_kernel(
    G,  # (N, F) row stride stride_g: gate pre-activation
    U,  # (N, F) row stride stride_u: up projection
    H,  # (N, F) contiguous, g.dtype
    F,
    stride_g,
    stride_u,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(H + row * F + cols, swiglu(g, u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(
    DH,  # (N, F) row stride stride_dh: gradient of h
    G,  # (N, F) row stride stride_g
    U,  # (N, F) row stride stride_u
    DG,  # (N, F) contiguous, g.dtype
    DU,  # (N, F) contiguous, u.dtype
    F,
    stride_dh,
    stride_g,
    stride_u,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    dh = tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dg, du = swiglu_grads(dh, g, u)
    tl.store(DG + row * F + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * F + cols, du.to(DU.dtype.element_ty), mask=mask)
