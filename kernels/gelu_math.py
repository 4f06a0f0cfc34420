"""GELU and its derivative as ``@triton.jit`` helpers, shared by the pointwise kernels and the matmul epilogues.

All math in fp32 on tiles of any shape. Exact form: gelu(u) = u Φ(u), gelu'(u) = Φ(u) + u φ(u).
tanh form (GPT-2's gelu_new), written with a sigmoid so that no libdevice tanh is needed (it is None under the
interpreter): with z = √(2/π)(u + 0.044715 u³) and s = sigmoid(2z) = 0.5(1 + tanh z) (2z clamped to ±80,
where fp32 sigmoid is already 0 or 1, so that exp never overflows),
gelu(u) = u s, gelu'(u) = s + 2 u s (1 - s) √(2/π)(1 + 3·0.044715 u²).
"""

import triton
import triton.language as tl

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
TANH_COEF = tl.constexpr(0.044715)
TANH_COEF_3 = tl.constexpr(0.134145)


@triton.jit
def gelu_and_grad(u, APPROX_TANH: tl.constexpr):
    """u: fp32 tile -> (gelu(u), gelu'(u)), both fp32 tiles of u's shape."""
    if APPROX_TANH:
        z = SQRT_2_OVER_PI * (u + TANH_COEF * u * u * u)
        s = tl.sigmoid(tl.minimum(tl.maximum(2.0 * z, -80.0), 80.0))
        dz = SQRT_2_OVER_PI * (1.0 + TANH_COEF_3 * u * u)
        act = u * s
        grad = s + 2.0 * u * s * (1.0 - s) * dz
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(u * INV_SQRT_2))
        pdf = tl.exp(-0.5 * u * u) * INV_SQRT_2PI
        act = u * cdf
        grad = cdf + u * pdf
    return act, grad
