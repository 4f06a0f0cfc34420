"""Row addressing shared by the row-wise kernels (LayerNorm, RMSNorm, elementwise SwiGLU), as ``@triton.jit`` helpers.

Each kernel reads rows of (N, d) tensors, every one with its own row stride and a unit column stride, and writes
contiguous (N, d) outputs; a program covers BLOCK columns starting at col0 (the norms: whole rows, col0 = 0).
row_block   (pid, cols, mask): program_id(0) in int64 (the row of a one-row program, N · stride may pass 2³¹; the
            partials row of a norm backward program), the BLOCK column indices and which of them are < d
load_row    P[row, cols] as fp32 (bf16 arithmetic is wrong under the interpreter), 0 beyond d
store_row   P[row, cols] = v cast to P's dtype, P contiguous (N, d)
"""

import triton
import triton.language as tl


@triton.jit
def row_block(col0, d, BLOCK: tl.constexpr):
    """(pid, cols, mask): int64 program_id(0), the columns col0 .. col0 + BLOCK - 1 and which of them are < d."""
    cols = col0 + tl.arange(0, BLOCK)
    return tl.program_id(0).to(tl.int64), cols, cols < d


@triton.jit
def load_row(P, row, stride, cols, mask):
    """P[row, cols] through row stride ``stride`` (unit column stride), fp32, 0 where masked off."""
    return tl.load(P + row * stride + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_row(P, row, d, cols, v, mask):
    """P[row, cols] = v in P's dtype, P contiguous with d columns."""
    tl.store(P + row * d + cols, v.to(P.dtype.element_ty), mask=mask)
