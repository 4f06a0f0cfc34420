"""Elementwise gated-MLP kernels over (N, F) rows, h = gate(g) · u, one kernel pair for every gate (constexpr GATE):
SILU (SwiGLU, the Llama MLP; the fused GEMMs use swiglu_math) and GELU_TANH (GeGLU, the Gemma / ModernBERT MLP).

gated_fwd: h = gate(g) · u                              → g.dtype
gated_bwd: dg = dh · u · gate'(g), du = dh · gate(g)    → g.dtype, u.dtype
silu: swiglu_math.swiglu / swiglu_grads; gelu_tanh(g) = g/2 · (1 + tanh(√(2/π)(g + 0.044715 g³))), written with a
sigmoid (gelu_math.gelu_and_grad, no libdevice tanh). g, u, dh (N, F) each with its own row stride and unit column
stride (a strided view costs no copy); outputs contiguous. Grid (N, cdiv(F, BLOCK)): one program per BLOCK columns of
one row; rows are loaded as fp32 (rows.load_row), fp32 math, stores in the output dtype.
"""

import triton
import triton.language as tl

from .gelu_math import gelu_and_grad
from .rows import load_row, row_block, store_row
from .swiglu_math import swiglu, swiglu_grads

SILU = tl.constexpr(0)  # the GATE values
GELU_TANH = tl.constexpr(1)


@triton.jit
def gated(g, u, GATE: tl.constexpr):
    """(g, u) fp32 tiles -> h = gate(g) · u."""
    if GATE == SILU:
        h = swiglu(g, u)
    else:
        act, _ = gelu_and_grad(g, True)
        h = act * u
    return h


@triton.jit
def gated_grads(dh, g, u, GATE: tl.constexpr):
    """(dh, g, u) fp32 tiles -> (dg, du)."""
    if GATE == SILU:
        dg, du = swiglu_grads(dh, g, u)
    else:
        act, grad = gelu_and_grad(g, True)
        dg = dh * u * grad
        du = dh * act
    return dg, du


@triton.jit
def gated_fwd_kernel(
    G,  # (N, F) row stride stride_g: gate pre-activation
    U,  # (N, F) row stride stride_u: up projection
    H,  # (N, F) contiguous, g.dtype
    F,
    stride_g,
    stride_u,
    GATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, cols, mask = row_block(tl.program_id(1) * BLOCK, F, BLOCK)
    h = gated(load_row(G, row, stride_g, cols, mask), load_row(U, row, stride_u, cols, mask), GATE)  # (BLOCK,)
    store_row(H, row, F, cols, h, mask)


@triton.jit
def gated_bwd_kernel(
    DH,  # (N, F) row stride stride_dh: gradient of h
    G,  # (N, F) row stride stride_g
    U,  # (N, F) row stride stride_u
    DG,  # (N, F) contiguous, g.dtype
    DU,  # (N, F) contiguous, u.dtype
    F,
    stride_dh,
    stride_g,
    stride_u,
    GATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, cols, mask = row_block(tl.program_id(1) * BLOCK, F, BLOCK)
    g = load_row(G, row, stride_g, cols, mask)  # (BLOCK,)
    u = load_row(U, row, stride_u, cols, mask)
    dg, du = gated_grads(load_row(DH, row, stride_dh, cols, mask), g, u, GATE)
    store_row(DG, row, F, cols, dg, mask)
    store_row(DU, row, F, cols, du, mask)
