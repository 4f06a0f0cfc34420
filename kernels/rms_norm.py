"""RMSNorm forward and backward kernels (Hugging Face's cast order), fp32 rstd, the output never kept for backward.

Forward (one program per row r of x (N, d)):
    rstd_r = 1 / sqrt(Σ x² / d + eps)            fp32, stored (N,)
    n = x · rstd rounded to x.dtype,  y = w · n  (fp32 product, stored in promote_types(x.dtype, w.dtype))
Backward (program p owns rows [p·R, (p+1)·R), R = rows_per_program), rebuilding x̂ = x · rstd from x and rstd:
    g = dy · w,  c = Σ g x̂ / d,  dx = (g - x̂ c) · rstd (+ dresidual)       → x.dtype
    y = w · n if EMIT_Y (the forward's output, for the next weight gradient)
    dw_part[p] = Σ_rows dy · n   (fp32 (P, d) partials; reduce.column_sums_kernel turns them into dweight in a
                                  second, small launch: P·d·4 bytes read, d written)
ROUND_N (constexpr): n is x̂ rounded to x.dtype (rounding.round_to; False for fp32 x, where it is the identity).
Every load is upcast to fp32 (bf16 arithmetic is wrong under the interpreter); stores cast to the output dtype.
BLOCK_D = next_power_of_2(d) columns per row, masked beyond d. Also Qwen3's per-head q/k norm with x viewed as
(N·heads, head_dim).
"""

import triton
import triton.language as tl

from .reduce import owned_rows
from .rounding import round_to
from .rows import load_row, row_block, store_row


@triton.jit
def rms_round(xhat, X_DTYPE: tl.constexpr, ROUND_N: tl.constexpr):
    """n = x̂ rounded to x's dtype (HF's ``.to(input_dtype)``), back in fp32 for the weight product."""
    if ROUND_N:
        xhat = round_to(xhat, X_DTYPE)
    return xhat


@triton.jit
def rms_norm_fwd_kernel(
    X,  # (N, d) row stride stride_x, unit column stride
    W,  # (d,) RMSNorm weight
    Y,  # (N, d) contiguous, promote_types(x.dtype, w.dtype)
    RSTD,  # (N,) fp32
    stride_x,
    d,
    eps,
    ROUND_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row, cols, mask = row_block(0, d, BLOCK_D)
    x = load_row(X, row, stride_x, cols, mask)  # (BLOCK_D,)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / d + eps)
    n = rms_round(x * rstd, X.dtype.element_ty, ROUND_N)
    store_row(Y, row, d, cols, load_row(W, 0, 0, cols, mask) * n, mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def rms_norm_bwd_kernel(
    DY,  # (N, d) row stride stride_dy, unit column stride: gradient of the RMSNorm output
    X,  # (N, d) row stride stride_x, unit column stride: RMSNorm input
    RSTD,  # (N,) fp32
    W,  # (d,) RMSNorm weight
    DRES,  # (N, d) row stride stride_dres: residual gradient added to dx (read only when HAS_DRES)
    DX,  # (N, d) contiguous, x.dtype
    Y,  # (N, d) contiguous, promote_types(x.dtype, w.dtype): rebuilt output (written only when EMIT_Y)
    DW_PART,  # (P, d) fp32: per-program partial sums of dy · n
    n_rows,
    d,
    stride_dy,
    stride_x,
    stride_dres,
    rows_per_program,
    HAS_DRES: tl.constexpr,
    EMIT_Y: tl.constexpr,
    ROUND_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid, cols, mask = row_block(0, d, BLOCK_D)
    w = load_row(W, 0, 0, cols, mask)  # (BLOCK_D,)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first, count = owned_rows(rows_per_program, n_rows)
    for i in range(0, count):
        row = first + i
        x = load_row(X, row, stride_x, cols, mask)
        dy = load_row(DY, row, stride_dy, cols, mask)
        rstd = tl.load(RSTD + row).to(tl.float32)
        xhat = x * rstd
        g = dy * w
        dx = (g - xhat * (tl.sum(g * xhat, axis=0) / d)) * rstd
        if HAS_DRES:
            dx += load_row(DRES, row, stride_dres, cols, mask)
        store_row(DX, row, d, cols, dx, mask)
        n = rms_round(xhat, X.dtype.element_ty, ROUND_N)
        if EMIT_Y:
            store_row(Y, row, d, cols, w * n, mask)
        dw += dy * n
    tl.store(DW_PART + pid * d + cols, dw, mask=mask)
