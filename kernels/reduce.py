"""Two-stage deterministic column sums (the norm backwards' dweight/dbias, ffn_recompute's db1), as Triton code.

Stage 1, inside the producing kernel: program p writes fp32 column sums into row p of a (P, d) partials buffer (the
norm backwards: over the rows owned_rows(R, N) = [p·R, min((p+1)·R, N)); ffn_recompute: over its BLOCK_M-row tile).
Stage 2, column_sums_kernel, a second, small launch:
    out_a[c] = Σ_p part_a[p, c]   (and out_b from part_b when HAS_B, in the same launch)
part_* (P, d) fp32 contiguous; out_* (d,) in the parameter's dtype (weight, bias or bias-gradient dtype), rounded
once after the fp32 sum. One program per BLOCK_D columns walks the P rows in BLOCK_P chunks; no atomics, so the
result is deterministic. Bytes: P·d·4 read (per buffer), d written.
"""

import triton
import triton.language as tl


@triton.jit
def owned_rows(rows_per_program, n_rows):
    """(first, count): the rows first .. first + count - 1 this program sums into its partials row; first is int64."""
    start = tl.program_id(0) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    return start.to(tl.int64), end - start


@triton.jit
def column_sums_kernel(
    PART_A,  # (P, d) fp32 contiguous
    OUT_A,  # (d,) output dtype
    PART_B,  # (P, d) fp32 contiguous (read only when HAS_B)
    OUT_B,  # (d,) output dtype (written only when HAS_B)
    P,
    d,
    HAS_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = cols < d
    acc_a = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        offs = rows[:, None].to(tl.int64) * d + cols[None, :]  # (BLOCK_P, BLOCK_D)
        mask = (rows < P)[:, None] & c_ok[None, :]
        acc_a += tl.sum(tl.load(PART_A + offs, mask=mask, other=0.0), axis=0)
        if HAS_B:
            acc_b += tl.sum(tl.load(PART_B + offs, mask=mask, other=0.0), axis=0)
    tl.store(OUT_A + cols, acc_a.to(OUT_A.dtype.element_ty), mask=c_ok)
    if HAS_B:
        tl.store(OUT_B + cols, acc_b.to(OUT_B.dtype.element_ty), mask=c_ok)
