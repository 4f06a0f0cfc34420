"""LayerNorm forward and backward kernels: one row per step, fp32 statistics, the output never kept for backward.

Forward (one program per row r of x (N, d)):
    mean_r = Σ x / d,  rstd_r = 1 / sqrt(Σ (x - mean)² / d + eps),  y = (x - mean) rstd w + b
Backward (program p owns rows [p·R, (p+1)·R), R = rows_per_program), rebuilding x̂ = (x - mean) rstd from x + stats:
    g = dy w,  c1 = Σ g x̂ / d,  c2 = Σ g / d,  dx = (g - c2 - x̂ c1) rstd (+ dresidual),  y = x̂ w + b if EMIT_Y
    dw_partial[p] = Σ_rows dy x̂,  db_partial[p] = Σ_rows dy   (fp32 (P, d) buffers, reduced once on the host)
Every load is upcast to fp32 (bf16 arithmetic is wrong under the interpreter); stores cast to the output dtype.
BLOCK_D = next_power_of_2(d) columns per row, masked beyond d.
"""

import triton
import triton.language as tl

from .reduce import owned_rows
from .rows import load_row, row_block, store_row


@triton.jit
def layer_norm_fwd_kernel(
    X,  # (N, d), row stride stride_x, unit column stride
    W,  # (d,) LayerNorm weight
    B,  # (d,) LayerNorm bias
    Y,  # (N, d) contiguous, x.dtype
    MEAN,  # (N,) fp32
    RSTD,  # (N,) fp32
    stride_x,
    d,
    eps,
    BLOCK_D: tl.constexpr,
):
    row, cols, mask = row_block(0, d, BLOCK_D)
    x = load_row(X, row, stride_x, cols, mask)
    mean = tl.sum(x, axis=0) / d
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / d
    rstd = 1.0 / tl.sqrt(var + eps)
    w = load_row(W, 0, 0, cols, mask)
    b = load_row(B, 0, 0, cols, mask)
    store_row(Y, row, d, cols, xc * rstd * w + b, mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def layer_norm_bwd_kernel(
    DY,  # (N, d) contiguous: gradient of the LayerNorm output
    X,  # (N, d), row stride stride_x, unit column stride: LayerNorm input
    MEAN,  # (N,) fp32
    RSTD,  # (N,) fp32
    W,  # (d,) LayerNorm weight
    B,  # (d,) LayerNorm bias (read only when EMIT_Y)
    DRES,  # (N, d) contiguous: residual gradient added to dx (read only when HAS_DRES)
    DX,  # (N, d) contiguous, x.dtype
    Y,  # (N, d) contiguous, x.dtype: rebuilt LayerNorm output (written only when EMIT_Y)
    DW_PART,  # (P, d) fp32: per-program partial sums of dy x̂
    DB_PART,  # (P, d) fp32: per-program partial sums of dy
    n_rows,
    d,
    stride_x,
    rows_per_program,
    HAS_DRES: tl.constexpr,
    EMIT_Y: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid, cols, mask = row_block(0, d, BLOCK_D)
    w = load_row(W, 0, 0, cols, mask)
    if EMIT_Y:
        b = load_row(B, 0, 0, cols, mask)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first, count = owned_rows(rows_per_program, n_rows)
    for i in range(0, count):
        row = first + i
        x = load_row(X, row, stride_x, cols, mask)
        dy = load_row(DY, row, d, cols, mask)
        mean = tl.load(MEAN + row).to(tl.float32)
        rstd = tl.load(RSTD + row).to(tl.float32)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy * w
        c1 = tl.sum(g * xhat, axis=0) / d
        c2 = tl.sum(g, axis=0) / d
        dx = (g - c2 - xhat * c1) * rstd
        if HAS_DRES:
            dx += load_row(DRES, row, d, cols, mask)
        store_row(DX, row, d, cols, dx, mask)
        if EMIT_Y:
            store_row(Y, row, d, cols, xhat * w + b, mask)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * d + cols, dw, mask=mask)
    tl.store(DB_PART + pid * d + cols, db, mask=mask)
