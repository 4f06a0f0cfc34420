"""Elementwise GeGLU kernels over (N, F) rows (the Gemma / ModernBERT gated MLP, activation="geglu").

geglu_fwd: h = gelu_tanh(g) · u                                 → g.dtype
geglu_bwd: dg = dh · u · gelu_tanh'(g), du = dh · gelu_tanh(g)  → g.dtype, u.dtype
gelu_tanh(g) = g/2 · (1 + tanh(√(2/π)(g + 0.044715 g³))), written with a sigmoid (gelu_math.gelu_and_grad, no libdevice
tanh). g, u, dh (N, F) each with its own row stride and unit column stride; outputs contiguous. Grid
(N, cdiv(F, BLOCK)): one program per BLOCK columns of one row; rows are loaded as fp32 (rows.load_row), stores in the
output dtype.
"""

import triton
import triton.language as tl

from .gelu_math import gelu_and_grad
from .rows import load_row, row_block, store_row


@triton.jit
def geglu_fwd_kernel(
    G,  # (N, F) row stride stride_g: gate pre-activation
    U,  # (N, F) row stride stride_u: up projection
    H,  # (N, F) contiguous, g.dtype
    F,
    stride_g,
    stride_u,
    BLOCK: tl.constexpr,
):
    row, cols, mask = row_block(tl.program_id(1) * BLOCK, F, BLOCK)
    act, _ = gelu_and_grad(load_row(G, row, stride_g, cols, mask), True)  # (BLOCK,) fp32
    store_row(H, row, F, cols, act * load_row(U, row, stride_u, cols, mask), mask)


@triton.jit
def geglu_bwd_kernel(
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
    dh = load_row(DH, row, stride_dh, cols, mask)  # (BLOCK,) fp32
    act, grad = gelu_and_grad(load_row(G, row, stride_g, cols, mask), True)
    store_row(DG, row, F, cols, dh * load_row(U, row, stride_u, cols, mask) * grad, mask)
    store_row(DU, row, F, cols, dh * act, mask)
