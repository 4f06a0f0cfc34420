"""Elementwise SwiGLU kernels over (N, F) rows (the none policy's pointwise ops; the fused GEMMs use swiglu_math).

swiglu_fwd: h = silu(g) · u                              → g.dtype
swiglu_bwd: dg = dh · u · silu'(g), du = dh · silu(g)    → g.dtype, u.dtype
g, u, dh (N, F) each with its own row stride and unit column stride (a strided view costs no copy); outputs
contiguous. Grid (N, cdiv(F, BLOCK)): one program per BLOCK columns of one row; fp32 math, stores in the output dtype.
"""

import triton
import triton.language as tl

from .rows import load_row, row_block, store_row
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
    row, cols, mask = row_block(tl.program_id(1) * BLOCK, F, BLOCK)
    h = swiglu(load_row(G, row, stride_g, cols, mask), load_row(U, row, stride_u, cols, mask))  # (BLOCK,)
    store_row(H, row, F, cols, h, mask)


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
    row, cols, mask = row_block(tl.program_id(1) * BLOCK, F, BLOCK)
    g = load_row(G, row, stride_g, cols, mask)  # (BLOCK,)
    u = load_row(U, row, stride_u, cols, mask)
    dg, du = swiglu_grads(load_row(DH, row, stride_dh, cols, mask), g, u)
    store_row(DG, row, F, cols, dg, mask)
    store_row(DU, row, F, cols, du, mask)
