"""Round-to-nearest-even of fp32 tiles to a narrower float dtype, kept in fp32, as a ``@triton.jit`` helper.

round_to(x, DTYPE): the fp32 value of x rounded to DTYPE (bf16, fp16 or fp32). Where Hugging Face's math rounds an
intermediate (RMSNorm's ``.to(input_dtype)``, a kept activation rebuilt in a prologue) the kernels round the same way.
bf16 is rounded with integer arithmetic on the fp32 bits (add 0x7FFF plus the lowest kept bit, clear the low 16 bits:
round-half-to-even, overflow to ±inf, NaN kept): the GPU's cvt.rn.bf16.f32 gives the same values, and the Triton
interpreter's fp32 -> bf16 cast truncates instead, which would make the interpreter lane check other numbers than the
GPU computes. fp16 goes through the dtype's own cast (round-to-nearest-even everywhere).
"""

import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """x: fp32 tile -> fp32 tile of x rounded (nearest, ties to even) to DTYPE."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    elif DTYPE == tl.float16:
        x = x.to(tl.float16).to(tl.float32)
    return x
