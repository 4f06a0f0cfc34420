"""Flash attention for ``ckpt_ext::gqa_attention_fwd`` / ``_bwd``: grouped-query, masks, hash dropout, empty rows.

Math and semantics: ckpt_ext/reference_attention.py. q (B, T, h, dh), k/v (B, S, hk, dh) through their strides (unit
last stride), G = h // hk query heads per kv head; nothing (B, h, T, S)-sized is ever written.
- ``gqa_fwd_kernel``, grid (cdiv(T, BLOCK_M), B·h): one query tile of one head; online softmax over key tiles
  (running row max m, row sum l, fp32 accumulator rescaled by exp(m_old - m_new)); the scores are
  scale · q kᵀ + mask tile (additive, or -inf where a bool keep-mask is 0; the mask is read through its broadcast
  strides, stride 0 over the dims it broadcasts, never expanded), -inf above the diagonal when causal (key tiles past
  the diagonal are skipped) and past S. The probabilities multiplying V carry the hash dropout at the flat
  (B, h, T, S) index ((b·h + i)·T + t)·S + s mod 2³² (kernels/dropout's hash, built in uint32 arithmetic:
  bit-identical to the reference); the row
  sum l is taken before dropout. A row whose max is <= EMPTY_THR (-inf, or finfo(mask dtype).min / 2 for float
  masks) has no visible key: out = 0, lse = -inf. Else out = acc / l, lse = m + log l (fp32, natural log).
- ``gqa_bwd_dq_kernel``, grid (cdiv(T, BLOCK_M), B·h): Δ = rowsum(dO ∘ O) for its query tile (stored for the dk/dv
  kernel), then over key tiles P = exp(S - lse) (0 where lse = -inf), dP = dropout(dO vᵀ), dS = P ∘ (dP - Δ),
  dq += dS k; dq = scale · dq.
- ``gqa_bwd_dkdv_kernel``, grid (cdiv(S, BLOCK_N), B·hk), launched after dq (reads Δ): one key tile of one kv head,
  looping over the G query heads of its group and their query tiles (from the diagonal on when causal):
  dv += dropout(P)ᵀ dO, dk += dSᵀ q; dk = scale · dk. The group sum happens in registers: no atomics, deterministic.
Segment ids (HAS_SEG; key padding and packed sequences, ckpt_ext/segments.py): SEG (B, S) int32/int64 contiguous
(T == S). Each program loads its query tile's ids (BLOCK_M,) once and each key tile's ids (BLOCK_N,) with the keys;
a key is hidden where its id differs from the row's |id| (no mask tensor is read): negative key ids (an encoder's
padded keys, whose rows still see their sequence) are never equal to an |id|. The forward's epilogue empties the rows
of id 0 (out = 0, lse = -inf), which is what keeps keys of id 0 unseen: a row sees a key only if the key's id is
positive and equals the row's |id|. Backward needs no id-0 test: those rows have lse = -inf, so P = 0. Tile skipping
uses ranges computed on the host (segments.key_ranges / query_ranges, both non-decreasing, exact for contiguous
sequences, else the whole row): the forward and dq kernels loop over key tiles from RSTART[first row] to REND[last
row] only (the launcher passes key_ranges), the dk/dv kernel over query tiles from RSTART[first key] to REND[last key]
(the launcher passes query_ranges there), so a packed batch costs about Σ len_i² instead of T² and an encoder's
trailing padded key tiles are skipped. The forward and dq loops count from 0 and offset by lo (a loop starting at a
runtime lo cost up to 40 more registers and spilled at head dim 256).
Sliding window (WINDOW, runtime ``window`` = w > 0, T == S): query t sees key s only if |t - s| <= w, on top of the
rest: scores outside the band are -inf, and the tile loops shrink to the band: the forward and dq kernels run key tiles
from max(0, first row - w) (rounded down to BLOCK_N) to last row + w, the dk/dv kernel query tiles from
max(0, first key - w) to last key + w, so a local layer costs O(T·w) instead of T². Without it (WINDOW=False) the
kernels are the same code as before (constexpr branches).
UPCAST (fp32 inputs, and always under TRITON_INTERPRET=1 where 16-bit dots miscompute): tiles go to fp32 and dots use
input_precision="ieee"; otherwise 16-bit operand dots with fp32 accumulation (P and dS rounded to the input dtype as
operands, as FlashAttention does). The mask's key stride is 1 (the launcher guarantees it): each mask tile is
BLOCK_M contiguous runs from (BLOCK_M,) int64 row offsets. ``compile_jobs(arch)`` yields the sm_90 compile-lane jobs
(tiles per head dim: flash_attention_tiles.SM90_TILES).
"""

import triton
import triton.language as tl

from .dropout import fmix32


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation: fp32 ieee operands when UPCAST, else a cast to b's (16-bit) dtype."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _masked(s, MASK, mask_offs, qi, kj, sq, sk, T, S, win, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
            HAS_SEG: tl.constexpr, WINDOW: tl.constexpr):  # fmt: skip
    """Scores tile s plus the mask read at MASK + mask_offs, -inf where hidden (bool mask 0, causal, key past S,
    a key id unlike the row's, |qi - kj| > win when WINDOW); qi / kj and sq / sk: query / key index and id tiles
    broadcastable to s (either orientation: s or sᵀ)."""
    inside = (qi < T) & (kj < S)
    if MASK_KIND == 1:
        keep = tl.load(MASK + mask_offs, mask=inside, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    if MASK_KIND == 2:
        s += tl.load(MASK + mask_offs, mask=inside, other=0.0).to(tl.float32)
    hidden = kj >= S
    if CAUSAL:
        hidden = hidden | (kj > qi)
    if HAS_SEG:  # sq holds |row id| (_row_ids): a negative key id never equals it, and rows of id 0 are emptied by
        hidden = hidden | (sk != sq)  # the forward's epilogue, so one compare suffices here
    if WINDOW:
        hidden = hidden | (tl.abs(kj - qi) > win)
    return tl.where(hidden, float("-inf"), s)


@triton.jit
def _scores(q, k, MASK, mask_rows, offs_m, offs_n, sq, sk, T, S, scale, win,
            CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SEG: tl.constexpr, UPCAST: tl.constexpr,
            WINDOW: tl.constexpr):  # fmt: skip
    """(BLOCK_M, BLOCK_N) fp32 scores of query rows offs_m against keys offs_n: scale · q kᵀ + mask, -inf where
    hidden. mask_rows: (BLOCK_M,) int64 offsets of the rows' mask key 0 (the mask's key stride is 1); sq (BLOCK_M,)
    and sk (BLOCK_N,): the rows' and keys' segment ids (read when HAS_SEG)."""
    s = _mm(q, tl.trans(k), UPCAST) * scale
    mask_offs = mask_rows[:, None] + offs_n[None, :]
    return _masked(s, MASK, mask_offs, offs_m[:, None], offs_n[None, :], sq[:, None], sk[None, :], T, S, win, CAUSAL,
                   MASK_KIND, HAS_SEG, WINDOW)  # fmt: skip


@triton.jit
def _ids(SEG, b, offs, n, HAS_SEG: tl.constexpr):
    """Segment ids (int) of positions offs of batch row b (0 past n); offs itself when there are none (unused)."""
    if HAS_SEG:
        return tl.load(SEG + b.to(tl.int64) * n + offs, mask=offs < n, other=0)
    return offs


@triton.jit
def _row_ids(SEG, b, offs, n, HAS_SEG: tl.constexpr):
    """|segment id| of query rows offs (loaded once per query tile, so the score tiles compare without an abs)."""
    ids = _ids(SEG, b, offs, n, HAS_SEG)
    if HAS_SEG:
        ids = tl.abs(ids)
    return ids


@triton.jit
def _range(RSTART, REND, b, first, last, n, BLOCK: tl.constexpr):
    """[lo, hi) of the positions a tile of rows (or keys) first..last may see, lo rounded down to a BLOCK multiple."""
    lo = tl.load(RSTART + b.to(tl.int64) * n + first)
    hi = tl.load(REND + b.to(tl.int64) * n + last) + 1
    return (lo // BLOCK) * BLOCK, hi


@triton.jit
def _keep(flat, key, threshold):
    """Hash dropout keep tile (kernels/dropout.py's mask) at the uint32 flat (B, h, T, S) indices ``flat`` (mod 2³²,
    as the reference; built in wrapping uint32 arithmetic: one register per element, no int64 tile)."""
    k = key.to(tl.uint32, bitcast=True)
    h = fmix32(fmix32(flat ^ k) + k)
    return (h >> 8).to(tl.int32) >= threshold


@triton.jit
def _tile(PTR, base, offs_r, stride_r, n_rows, offs_d, dh, UPCAST: tl.constexpr):
    """(rows, BLOCK_D) tile at PTR + base + r·stride_r + d (zeros outside), fp32 when UPCAST."""
    x = tl.load(PTR + base + offs_r[:, None] * stride_r + offs_d[None, :],
                mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < dh), other=0.0)  # fmt: skip
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _key_bounds(RSTART, REND, b, pid_m, T, S, win, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr,
                WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """[lo, hi) of the keys query tile pid_m may see: up to its diagonal when causal, its rows' segment key ranges
    when HAS_SEG, first row - win .. last row + win when WINDOW (lo a BLOCK_N multiple)."""
    lo = 0
    hi = tl.minimum(S, (pid_m + 1) * BLOCK_M) if CAUSAL else S
    if HAS_SEG:
        lo, seg_hi = _range(RSTART, REND, b, pid_m * BLOCK_M, tl.minimum(T, (pid_m + 1) * BLOCK_M) - 1, S, BLOCK_N)
        hi = tl.minimum(hi, seg_hi)
    if WINDOW:
        lo = tl.maximum(lo, (tl.maximum(pid_m * BLOCK_M - win, 0) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(hi, tl.minimum(T, (pid_m + 1) * BLOCK_M) + win)
    return lo, hi


@triton.jit
def _query_bases(b, i, j, offs_m, skb, skh, svb, svh, smb, smh, smt, T, S, H):
    """Offsets a query tile of head i (kv head j) reads keys with: K / V bases, (BLOCK_M,) int64 mask row offsets
    and uint32 flat (B, h, T, S) index of each row's key 0 (mod 2³², the dropout hash's index)."""
    k_base = b.to(tl.int64) * skb + j * skh
    v_base = b.to(tl.int64) * svb + j * svh
    mask_rows = b.to(tl.int64) * smb + i * smh + offs_m.to(tl.int64) * smt
    row_flat = (((b.to(tl.int64) * H + i) * T + offs_m) * S).to(tl.uint32)
    return k_base, v_base, mask_rows, row_flat


@triton.jit
def _key_step(q, K, V, MASK, SEG, b, k_base, v_base, skt, svt, mask_rows, offs_m, offs_n, offs_d, sq, T, S, dh,
              scale, win, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SEG: tl.constexpr,
              UPCAST: tl.constexpr, WINDOW: tl.constexpr):  # fmt: skip
    """One key tile offs_n of a query tile's loop: its (BLOCK_N, BLOCK_D) k and v tiles and the (BLOCK_M, BLOCK_N)
    fp32 scores against q (-inf where hidden)."""
    k = _tile(K, k_base, offs_n, skt, S, offs_d, dh, UPCAST)
    v = _tile(V, v_base, offs_n, svt, S, offs_d, dh, UPCAST)
    sk = _ids(SEG, b, offs_n, S, HAS_SEG)
    s = _scores(q, k, MASK, mask_rows, offs_m, offs_n, sq, sk, T, S, scale, win, CAUSAL, MASK_KIND, HAS_SEG, UPCAST,
                WINDOW)  # fmt: skip
    return k, v, s


@triton.jit
def _row_lse(LSE, lse_ptrs, offs_m, T):
    """The rows' forward log-sum-exp (0 for a row that saw no key) and that no-key flag, both (BLOCK_M,)."""
    lse = tl.load(LSE + lse_ptrs, mask=offs_m < T, other=float("-inf"))
    no_key = lse == float("-inf")
    return tl.where(no_key, 0.0, lse), no_key


@triton.jit
def _probs_dp(s, lse, no_key, do, v, UPCAST: tl.constexpr):
    """Backward's P = exp(s - lse) (0 on no-key rows) and dP = dO vᵀ (before dropout), both (BLOCK_M, BLOCK_N)."""
    p = tl.where(no_key[:, None], 0.0, tl.exp(s - lse[:, None]))
    return p, _mm(do, tl.trans(v), UPCAST)


@triton.jit(do_not_specialize=["key", "threshold"])
def gqa_fwd_kernel(
    Q, K, V,  # (B, T, h, dh) / (B, S, hk, dh) through strides, unit last stride
    MASK,  # (B|1, h|1, T|1, S|1) bool (as uint8) or float, through broadcast strides (read when MASK_KIND > 0)
    SEG, RSTART, REND,  # (B, S) segment ids, first / last visible key per row int32 (read when HAS_SEG)
    OUT,  # (B, T, h, dh) contiguous, q.dtype
    LSE,  # (B, h, T) contiguous fp32
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    smb, smh, smt,  # mask strides (its key stride is 1)
    T, S, H, G, dh,
    scale, empty_thr,
    key, threshold, drop_scale,  # hash dropout: int32 key bit pattern, floor(p · 2²⁴), 1 / (1 - p)
    win,  # sliding window w (read when WINDOW)
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SEG: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, i = pid_bh // H, pid_bh % H
    j = i // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _tile(Q, b.to(tl.int64) * sqb + i * sqh, offs_m, sqt, T, offs_d, dh, UPCAST)
    k_base, v_base, mask_rows, row_flat = _query_bases(b, i, j, offs_m, skb, skh, svb, svh, smb, smh, smt, T, S, H)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    sq = _row_ids(SEG, b, offs_m, T, HAS_SEG)
    lo, hi = _key_bounds(RSTART, REND, b, pid_m, T, S, win, CAUSAL, HAS_SEG, WINDOW, BLOCK_M, BLOCK_N)
    for n0 in range(0, hi - lo, BLOCK_N):
        offs_n = lo + n0 + tl.arange(0, BLOCK_N)
        k, v, s = _key_step(q, K, V, MASK, SEG, b, k_base, v_base, skt, svt, mask_rows, offs_m, offs_n, offs_d, sq, T,
                            S, dh, scale, win, CAUSAL, MASK_KIND, HAS_SEG, UPCAST, WINDOW)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            keep = _keep(row_flat[:, None] + offs_n[None, :].to(tl.uint32), key, threshold)
            p = tl.where(keep, p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + _mm(p, v, UPCAST)
        m_i = m_new
    empty = m_i <= empty_thr
    if HAS_SEG:
        empty = empty | (sq == 0)
    out = tl.where(empty[:, None], 0.0, acc / l_i[:, None])
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_i))
    o_ptrs = OUT + ((b.to(tl.int64) * T + offs_m[:, None]) * H + i) * dh + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < T) & (offs_d[None, :] < dh))
    tl.store(LSE + (b.to(tl.int64) * H + i) * T + offs_m, lse, mask=offs_m < T)


@triton.jit(do_not_specialize=["key", "threshold"])
def gqa_bwd_dq_kernel(
    DO, Q, K, V, OUT,  # dO, out: (B, T, h, dh) contiguous; q, k, v through strides
    LSE,  # (B, h, T) fp32
    DELTA,  # (B, h, T) fp32 out: rowsum(dO ∘ O)
    DQ,  # (B, T, h, dh) contiguous, q.dtype
    MASK,
    SEG, RSTART, REND,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    smb, smh, smt,  # mask strides (its key stride is 1)
    T, S, H, G, dh,
    scale,
    key, threshold, drop_scale,
    win,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SEG: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, i = pid_bh // H, pid_bh % H
    j = i // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_base = b.to(tl.int64) * T * H * dh + i * dh  # contiguous (B, T, h, dh): dO, O, dQ
    q = _tile(Q, b.to(tl.int64) * sqb + i * sqh, offs_m, sqt, T, offs_d, dh, UPCAST)
    do = _tile(DO, row_base, offs_m, H * dh, T, offs_d, dh, UPCAST)
    o = _tile(OUT, row_base, offs_m, H * dh, T, offs_d, dh, True)
    delta = tl.sum(do.to(tl.float32) * o, axis=1)  # (BLOCK_M,)
    lse_ptrs = (b.to(tl.int64) * H + i) * T + offs_m
    tl.store(DELTA + lse_ptrs, delta, mask=offs_m < T)
    lse, no_key = _row_lse(LSE, lse_ptrs, offs_m, T)
    k_base, v_base, mask_rows, row_flat = _query_bases(b, i, j, offs_m, skb, skh, svb, svh, smb, smh, smt, T, S, H)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    sq = _row_ids(SEG, b, offs_m, T, HAS_SEG)
    lo, hi = _key_bounds(RSTART, REND, b, pid_m, T, S, win, CAUSAL, HAS_SEG, WINDOW, BLOCK_M, BLOCK_N)
    for n0 in range(0, hi - lo, BLOCK_N):
        offs_n = lo + n0 + tl.arange(0, BLOCK_N)
        k, v, s = _key_step(q, K, V, MASK, SEG, b, k_base, v_base, skt, svt, mask_rows, offs_m, offs_n, offs_d, sq, T,
                            S, dh, scale, win, CAUSAL, MASK_KIND, HAS_SEG, UPCAST, WINDOW)  # fmt: skip
        p, dp = _probs_dp(s, lse, no_key, do, v, UPCAST)
        if DROPOUT:
            keep = _keep(row_flat[:, None] + offs_n[None, :].to(tl.uint32), key, threshold)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds, k, UPCAST)
    tl.store(DQ + row_base + offs_m[:, None] * H * dh + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < T) & (offs_d[None, :] < dh))  # fmt: skip


@triton.jit(do_not_specialize=["key", "threshold"])
def gqa_bwd_dkdv_kernel(
    DO, Q, K, V,
    LSE, DELTA,  # (B, h, T) fp32
    DK, DV,  # (B, S, hk, dh) contiguous, k.dtype / v.dtype
    MASK,
    SEG, RSTART, REND,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    smb, smh, smt,  # mask strides (its key stride is 1)
    T, S, H, G, dh,
    scale,
    key, threshold, drop_scale,
    win,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SEG: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n, pid_bj = tl.program_id(0), tl.program_id(1)
    HK = H // G
    b, j = pid_bj // HK, pid_bj % HK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _tile(K, b.to(tl.int64) * skb + j * skh, offs_n, skt, S, offs_d, dh, UPCAST)
    v = _tile(V, b.to(tl.int64) * svb + j * svh, offs_n, svt, S, offs_d, dh, UPCAST)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    hi = T
    sk = _ids(SEG, b, offs_n, S, HAS_SEG)
    if HAS_SEG:  # the rows that may see keys offs_n (the launcher passes segments.query_ranges here)
        seg_lo, hi = _range(RSTART, REND, b, pid_n * BLOCK_N, tl.minimum(S, (pid_n + 1) * BLOCK_N) - 1, S, BLOCK_M)
        lo = tl.maximum(lo, seg_lo)
    if WINDOW:  # the rows within win of keys offs_n
        lo = tl.maximum(lo, (tl.maximum(pid_n * BLOCK_N - win, 0) // BLOCK_M) * BLOCK_M)
        hi = tl.minimum(hi, tl.minimum(S, (pid_n + 1) * BLOCK_N) + win)
    for gi in range(0, G):
        i = j * G + gi
        q_base = b.to(tl.int64) * sqb + i * sqh
        row_base = b.to(tl.int64) * T * H * dh + i * dh
        mask_base = b.to(tl.int64) * smb + i * smh
        flat_base = (b.to(tl.int64) * H + i) * T
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            sq = _row_ids(SEG, b, offs_m, T, HAS_SEG)
            q = _tile(Q, q_base, offs_m, sqt, T, offs_d, dh, UPCAST)
            do = _tile(DO, row_base, offs_m, H * dh, T, offs_d, dh, UPCAST)
            lse_ptrs = (b.to(tl.int64) * H + i) * T + offs_m
            lse, no_key = _row_lse(LSE, lse_ptrs, offs_m, T)
            delta = tl.load(DELTA + lse_ptrs, mask=offs_m < T, other=0.0)
            mask_rows = mask_base + offs_m.to(tl.int64) * smt
            s = _scores(q, k, MASK, mask_rows, offs_m, offs_n, sq, sk, T, S, scale, win, CAUSAL, MASK_KIND, HAS_SEG,
                        UPCAST, WINDOW)  # fmt: skip
            p, dp = _probs_dp(s, lse, no_key, do, v, UPCAST)  # (BLOCK_M, BLOCK_N)
            pd = p
            if DROPOUT:
                flat = ((flat_base + offs_m) * S).to(tl.uint32)[:, None] + offs_n[None, :].to(tl.uint32)
                keep = _keep(flat, key, threshold)
                pd = tl.where(keep, p * drop_scale, 0.0)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            dv += _mm(tl.trans(pd), do, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += _mm(tl.trans(ds), q, UPCAST)
    out_ptrs = (b.to(tl.int64) * S + offs_n[:, None]) * HK * dh + j * dh + offs_d[None, :]
    inside = (offs_n[:, None] < S) & (offs_d[None, :] < dh)
    tl.store(DK + out_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=inside)
    tl.store(DV + out_ptrs, dv.to(DV.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------- compile lane
KERNELS = {"gqa_fwd": gqa_fwd_kernel, "gqa_bwd_dq": gqa_bwd_dq_kernel, "gqa_bwd_dkdv": gqa_bwd_dkdv_kernel}
BLOCK_DS = (16, 32, 64, 128, 256)


def _signature(name: str, dt: str, mask_t: str) -> dict:
    """The kernel's non-constexpr arguments: pointers in dtype dt (the mask in mask_t), i32 strides and sizes."""
    p = f"*{dt}"
    seg = dict(SEG="*i32", RSTART="*i32", REND="*i32")
    ptrs = {
        "gqa_fwd": dict(Q=p, K=p, V=p, MASK=mask_t, **seg, OUT=p, LSE="*fp32"),
        "gqa_bwd_dq": dict(DO=p, Q=p, K=p, V=p, OUT=p, LSE="*fp32", DELTA="*fp32", DQ=p, MASK=mask_t, **seg),
        "gqa_bwd_dkdv": dict(DO=p, Q=p, K=p, V=p, LSE="*fp32", DELTA="*fp32", DK=p, DV=p, MASK=mask_t, **seg),
    }[name]
    ints = ("sqb", "sqt", "sqh", "skb", "skt", "skh", "svb", "svt", "svh", "smb", "smh", "smt",
            "T", "S", "H", "G", "dh")  # fmt: skip
    scalars = dict(scale="fp32", empty_thr="fp32") if name == "gqa_fwd" else dict(scale="fp32")
    drop = {"key": "i32", "threshold": "i32", "drop_scale": "fp32", "win": "i32"}
    return {**ptrs, **{n: "i32" for n in ints}, **scalars, **drop}


def compile_jobs(arch: int):
    """(name, jit fn, signature, constexprs, options, attrs) for the compile lane (kernels/compile_check.py): every
    (kernel, BLOCK_D, operand dtype) the launcher's ``gpu_tiles(name, dh, arch, dtype)`` can pick, in fp16, bf16 and
    fp32 (UPCAST), at the heaviest flags (causal, an fp32 additive mask read per key tile, segment ids, dropout, a
    sliding window),
    and in bf16 at head dims 64 and 128 with a bool mask and with segment ids alone too (the register allocation is
    not monotone in the flags: a bool-mask variant spilled where the fp32-mask one did not). Without segment ids
    (HAS_SEG=False) the kernels are the same code as before they took them (the branches are constexpr). attrs:
    16-byte aligned pointers and 16-divisible strides / H / G / dh, T and S arbitrary (the JIT's specialization of
    usual layouts; the mask's key stride is 1 by construction, see the launcher)."""
    import torch

    from .flash_attention_tiles import gpu_tiles

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    variants = [(dt, bd, "*fp32", 2) for bd in BLOCK_DS for dt in dtypes]
    variants += [("bf16", bd, m, kind) for bd in (64, 128) for m, kind in (("*u8", 1), ("*fp32", 0))]
    for name, fn in KERNELS.items():
        for dt, block_d, mask_t, kind in variants:
            tiles, opts = gpu_tiles(name, block_d, arch, dtypes[dt])
            const = dict(CAUSAL=True, MASK_KIND=kind, HAS_SEG=True, DROPOUT=True, UPCAST=dt == "fp32", WINDOW=True,
                         **tiles)  # fmt: skip
            sig = {**_signature(name, dt, mask_t), **{c: "constexpr" for c in const}}
            attrs = {
                (fn.arg_names.index(a),): [["tt.divisibility", 16]]
                for a, ty in sig.items()
                if ty.startswith("*") or (ty == "i32" and a not in ("T", "S", "key", "threshold", "win"))
            }
            yield (name, fn, sig, const, opts, attrs)
