"""Flash attention for ``ckpt_ext::gqa_attention_fwd`` / ``_bwd``: grouped-query, masks, hash dropout, empty rows.

Math and semantics: ckpt_ext/reference_attention.py. q (B, T, h, dh), k/v (B, S, hk, dh) through their strides (unit
last stride), G = h // hk query heads per kv head; nothing (B, h, T, S)-sized is ever written.
- ``gqa_fwd_kernel``, grid (cdiv(T, BLOCK_M), B·h): one query tile of one head; online softmax over key tiles
  (running row max m, row sum l, fp32 accumulator rescaled by exp(m_old - m_new)); the scores are
  scale · q kᵀ + mask tile (additive, or -inf where a bool keep-mask is 0; the mask is read through its broadcast
  strides, stride 0 over the dims it broadcasts, never expanded), -inf above the diagonal when causal (key tiles past
  the diagonal are skipped) and past S. The probabilities multiplying V carry the hash dropout at the flat
  (B, h, T, S) index ((b·h + i)·T + t)·S + s (kernels/dropout.apply_dropout, bit-identical to the reference); the row
  sum l is taken before dropout. A row whose max is <= EMPTY_THR (-inf, or finfo(mask dtype).min / 2 for float
  masks) has no visible key: out = 0, lse = -inf. Else out = acc / l, lse = m + log l (fp32, natural log).
- ``gqa_bwd_dq_kernel``, grid (cdiv(T, BLOCK_M), B·h): Δ = rowsum(dO ∘ O) for its query tile (stored for the dk/dv
  kernel), then over key tiles P = exp(S - lse) (0 where lse = -inf), dP = dropout(dO vᵀ), dS = P ∘ (dP - Δ),
  dq += dS k; dq = scale · dq.
- ``gqa_bwd_dkdv_kernel``, grid (cdiv(S, BLOCK_N), B·hk), launched after dq (reads Δ): one key tile of one kv head,
  looping over the G query heads of its group and their query tiles (from the diagonal on when causal):
  dv += dropout(P)ᵀ dO, dk += dSᵀ q; dk = scale · dk. The group sum happens in registers: no atomics, deterministic.
UPCAST (fp32 inputs, and always under TRITON_INTERPRET=1 where 16-bit dots miscompute): tiles go to fp32 and dots use
input_precision="ieee"; otherwise 16-bit operand dots with fp32 accumulation (P and dS rounded to the input dtype as
operands, as FlashAttention does). ``compile_jobs(arch)`` yields the sm_90 compile-lane jobs.
"""

import triton
import triton.language as tl

from .dropout import apply_dropout


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation: fp32 ieee operands when UPCAST, else a cast to b's (16-bit) dtype."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _scores(q, k, MASK, mask_base, smt, sms, offs_m, offs_n, T, S, scale,
            CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """(BLOCK_M, BLOCK_N) fp32 scores of query rows offs_m against keys offs_n: scale · q kᵀ + mask, -inf where
    hidden (bool mask 0, causal, key past S)."""
    s = _mm(q, tl.trans(k), UPCAST) * scale
    inside = (offs_m[:, None] < T) & (offs_n[None, :] < S)
    if MASK_KIND == 1:
        keep = tl.load(MASK + mask_base + offs_m[:, None] * smt + offs_n[None, :] * sms, mask=inside, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    if MASK_KIND == 2:
        bias = tl.load(MASK + mask_base + offs_m[:, None] * smt + offs_n[None, :] * sms, mask=inside, other=0.0)
        s += bias.to(tl.float32)
    hidden = offs_n[None, :] >= S
    if CAUSAL:
        hidden = hidden | (offs_n[None, :] > offs_m[:, None])
    return tl.where(hidden, float("-inf"), s)


@triton.jit
def _tile(PTR, base, offs_r, stride_r, n_rows, offs_d, dh, UPCAST: tl.constexpr):
    """(rows, BLOCK_D) tile at PTR + base + r·stride_r + d (zeros outside), fp32 when UPCAST."""
    x = tl.load(PTR + base + offs_r[:, None] * stride_r + offs_d[None, :],
                mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < dh), other=0.0)  # fmt: skip
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit(do_not_specialize=["key", "threshold"])
def gqa_fwd_kernel(
    Q, K, V,  # (B, T, h, dh) / (B, S, hk, dh) through strides, unit last stride
    MASK,  # (B|1, h|1, T|1, S|1) bool (as uint8) or float, through broadcast strides (read when MASK_KIND > 0)
    OUT,  # (B, T, h, dh) contiguous, q.dtype
    LSE,  # (B, h, T) contiguous fp32
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    smb, smh, smt, sms,
    T, S, H, G, dh,
    scale, empty_thr,
    key, threshold, drop_scale,  # hash dropout: int32 key bit pattern, floor(p · 2²⁴), 1 / (1 - p)
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, i = pid_bh // H, pid_bh % H
    j = i // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _tile(Q, b.to(tl.int64) * sqb + i * sqh, offs_m, sqt, T, offs_d, dh, UPCAST)
    k_base = b.to(tl.int64) * skb + j * skh
    v_base = b.to(tl.int64) * svb + j * svh
    mask_base = b.to(tl.int64) * smb + i * smh
    row_flat = ((b.to(tl.int64) * H + i) * T + offs_m) * S  # flat (B, h, T, S) index of each row's key 0
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = tl.minimum(S, (pid_m + 1) * BLOCK_M) if CAUSAL else S
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _tile(K, k_base, offs_n, skt, S, offs_d, dh, UPCAST)
        v = _tile(V, v_base, offs_n, svt, S, offs_d, dh, UPCAST)
        s = _scores(q, k, MASK, mask_base, smt, sms, offs_m, offs_n, T, S, scale, CAUSAL, MASK_KIND, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            p = apply_dropout(p, row_flat[:, None] + offs_n[None, :], key, threshold, drop_scale)
        acc = acc * alpha[:, None] + _mm(p, v, UPCAST)
        m_i = m_new
    empty = m_i <= empty_thr
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
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    smb, smh, smt, sms,
    T, S, H, G, dh,
    scale,
    key, threshold, drop_scale,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    lse = tl.load(LSE + lse_ptrs, mask=offs_m < T, other=float("-inf"))
    no_key = lse == float("-inf")
    lse = tl.where(no_key, 0.0, lse)
    k_base = b.to(tl.int64) * skb + j * skh
    v_base = b.to(tl.int64) * svb + j * svh
    mask_base = b.to(tl.int64) * smb + i * smh
    row_flat = ((b.to(tl.int64) * H + i) * T + offs_m) * S
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = tl.minimum(S, (pid_m + 1) * BLOCK_M) if CAUSAL else S
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _tile(K, k_base, offs_n, skt, S, offs_d, dh, UPCAST)
        v = _tile(V, v_base, offs_n, svt, S, offs_d, dh, UPCAST)
        s = _scores(q, k, MASK, mask_base, smt, sms, offs_m, offs_n, T, S, scale, CAUSAL, MASK_KIND, UPCAST)
        p = tl.where(no_key[:, None], 0.0, tl.exp(s - lse[:, None]))
        dp = _mm(do, tl.trans(v), UPCAST)
        if DROPOUT:
            dp = apply_dropout(dp, row_flat[:, None] + offs_n[None, :], key, threshold, drop_scale)
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
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    smb, smh, smt, sms,
    T, S, H, G, dh,
    scale,
    key, threshold, drop_scale,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    for gi in range(0, G):
        i = j * G + gi
        q_base = b.to(tl.int64) * sqb + i * sqh
        row_base = b.to(tl.int64) * T * H * dh + i * dh
        mask_base = b.to(tl.int64) * smb + i * smh
        for m0 in range(lo, T, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = _tile(Q, q_base, offs_m, sqt, T, offs_d, dh, UPCAST)
            do = _tile(DO, row_base, offs_m, H * dh, T, offs_d, dh, UPCAST)
            lse_ptrs = (b.to(tl.int64) * H + i) * T + offs_m
            lse = tl.load(LSE + lse_ptrs, mask=offs_m < T, other=float("-inf"))
            delta = tl.load(DELTA + lse_ptrs, mask=offs_m < T, other=0.0)
            no_key = lse == float("-inf")
            lse = tl.where(no_key, 0.0, lse)
            s = _scores(q, k, MASK, mask_base, smt, sms, offs_m, offs_n, T, S, scale, CAUSAL, MASK_KIND, UPCAST)
            p = tl.where(no_key[:, None], 0.0, tl.exp(s - lse[:, None]))  # (BLOCK_M, BLOCK_N)
            dp = _mm(do, tl.trans(v), UPCAST)
            pd = p
            if DROPOUT:
                flat = ((b.to(tl.int64) * H + i) * T + offs_m)[:, None] * S + offs_n[None, :]
                pd = apply_dropout(p, flat, key, threshold, drop_scale)
                dp = apply_dropout(dp, flat, key, threshold, drop_scale)
            dv += _mm(tl.trans(pd), do, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += _mm(tl.trans(ds), q, UPCAST)
    out_ptrs = (b.to(tl.int64) * S + offs_n[:, None]) * HK * dh + j * dh + offs_d[None, :]
    inside = (offs_n[:, None] < S) & (offs_d[None, :] < dh)
    tl.store(DK + out_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=inside)
    tl.store(DV + out_ptrs, dv.to(DV.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------- compile lane
def compile_jobs(arch: int):
    """(name, jit fn, signature, constexprs, options) for the compile lane, in kernels/compile_check.py's ``_jobs``
    format, at the launcher's GPU tiles: fp16 and bf16 at head dim 128 (the largest register and shared-memory
    footprint) causal with a bool mask and dropout, and fp16 at head dim 64 non-causal with an additive mask."""
    from .flash_attention_launchers import gpu_tiles

    strides = {n: "i32" for n in ("sqb", "sqt", "sqh", "skb", "skt", "skh", "svb", "svt", "svh",
                                  "smb", "smh", "smt", "sms")}  # fmt: skip
    shape = dict(T="i32", S="i32", H="i32", G="i32", dh="i32")
    drop = dict(key="i32", threshold="i32", drop_scale="fp32")
    variants = (("fp16", 128, True, 1), ("bf16", 128, True, 1), ("fp16", 64, False, 2))
    for dt, dh, causal, mask_kind in variants:
        p = f"*{dt}"
        mask_t = "*u8" if mask_kind == 1 else p
        flags = dict(CAUSAL=causal, MASK_KIND=mask_kind, DROPOUT=causal, UPCAST=False)
        for name, fn, ptrs, extra in (
            ("gqa_fwd", gqa_fwd_kernel, dict(Q=p, K=p, V=p, MASK=mask_t, OUT=p, LSE="*fp32"),
             dict(scale="fp32", empty_thr="fp32")),
            ("gqa_bwd_dq", gqa_bwd_dq_kernel,
             dict(DO=p, Q=p, K=p, V=p, OUT=p, LSE="*fp32", DELTA="*fp32", DQ=p, MASK=mask_t), dict(scale="fp32")),
            ("gqa_bwd_dkdv", gqa_bwd_dkdv_kernel,
             dict(DO=p, Q=p, K=p, V=p, LSE="*fp32", DELTA="*fp32", DK=p, DV=p, MASK=mask_t), dict(scale="fp32")),
        ):  # fmt: skip
            tiles, opts = gpu_tiles(name, dh, arch)
            const = {**flags, **tiles}
            sig = {**ptrs, **strides, **shape, **extra, **drop, **{c: "constexpr" for c in const}}
            yield (name, fn, sig, const, opts)
