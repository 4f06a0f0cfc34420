"""SwiGLU and its derivatives as ``@triton.jit`` helpers, shared by the pointwise kernels and the matmul epilogues.

All math in fp32 on tiles of any shape, with s = sigmoid(g):
    h = silu(g) · u = g s u
    dg = dh · u · silu'(g) = dh · u · s (1 + g (1 - s)),   du = dh · silu(g) = dh · g s
tl.sigmoid is exact enough in fp32 and runs under the interpreter (no libdevice call).
"""

import triton
import triton.language as tl


@triton.jit
def swiglu(g, u):
    """(g, u) fp32 tiles -> h = silu(g) · u."""
    return g * tl.sigmoid(g) * u


@triton.jit
def swiglu_grads(dh, g, u):
    """(dh, g, u) fp32 tiles -> (dg, du)."""
    s = tl.sigmoid(g)
    return dh * u * s * (1.0 + g * (1.0 - s)), dh * g * s


@triton.jit
def swiglu_and_grads(dh, g, u):
    """(dh, g, u) fp32 tiles -> (h, dg, du), sharing one sigmoid."""
    s = tl.sigmoid(g)
    gs = g * s
    return gs * u, dh * u * s * (1.0 + g * (1.0 - s)), dh * gs
