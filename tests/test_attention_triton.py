"""The Triton flash-attention kernels (kernels/flash_attention.py) under TRITON_INTERPRET=1 against float64 reference
math: causal and not, every mask form, hash dropout, GQA ratios, T and S not multiples of the 16-row interpreter tile,
fp32/bf16/fp16; the dropout mask bit for bit; the packed-qkv ops through the triton backend; masks without a unit
key stride; compile_jobs covering every sm_90 config gpu_tiles can pick (the compile itself, registers and spills:
tests/test_triton_compile.py). Tiny shapes: the interpreter runs programs one by one."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_attention_ops import _tolerance_check, make_mask, make_qkv, run_with_references  # noqa: E402

import ckpt_ext  # noqa: E402
from ckpt_ext import ops, reference, reference_attention  # noqa: E402

pytestmark = pytest.mark.triton

CASES = [  # b, t, s, h, hk, dh, causal, mask, dropout_p, dtype
    (1, 7, 7, 2, 1, 12, True, None, 0.0, torch.float32),
    (2, 21, 21, 4, 2, 8, True, "bool_1hts", 0.3, torch.float32),
    (1, 21, 21, 2, 2, 16, False, "float_b1ts", 0.3, torch.float32),
    (3, 1, 1, 2, 1, 8, False, "float_ts", 0.0, torch.float32),
    (1, 5, 19, 4, 1, 8, False, "bool_b11s", 0.2, torch.float32),
    (1, 17, 17, 4, 1, 16, True, "bool_b11s", 0.0, torch.bfloat16),
    (1, 17, 17, 2, 1, 16, False, "float_b1ts", 0.2, torch.float16),
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy evaluates both sides of tl.where
@pytest.mark.parametrize("b, t, s, h, hk, dh, causal, mask, dropout_p, dtype", CASES)
def test_triton_matches_float64_reference(b, t, s, h, hk, dh, causal, mask, dropout_p, dtype):
    from ckpt_ext.backends.triton import attention as fa

    q, k, v = make_qkv(b, t, h, hk, dh, s=s, dtype=dtype)
    m = make_mask(mask, b, h, t, s, dtype if dtype != torch.bfloat16 else torch.float32)
    dout = torch.randn(b, t, h, dh, dtype=dtype)
    args = (causal, dropout_p, 21, m, dh**-0.5)
    r = run_with_references(fa, dout, q, k, v, *args)
    assert r.out.dtype == dtype and r.lse.dtype == torch.float32 and r.out.shape == (b, t, h, dh)
    _tolerance_check(r.out, r.o64, r.r_out, r.t_out)
    torch.testing.assert_close(r.lse.double(), r.l64, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
    for ours, ref64, ref, eager in zip(r.grads, r.g64, r.r_grads, r.t_grads):
        assert ours.dtype == dtype and ours.shape == ref.shape
        _tolerance_check(ours, ref64, ref, eager, floor=1e-5)


CUDA_CASES = [  # b, t, h, hk, dh, causal, mask, dropout_p
    (2, 300, 8, 2, 64, True, None, 0.0),
    (2, 300, 8, 2, 64, True, "bool_b11s", 0.1),
    (1, 257, 4, 4, 128, False, "float_b1ts", 0.1),
    (3, 77, 8, 1, 80, True, "bool_1hts", 0.0),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, t, h, hk, dh, causal, mask, dropout_p", CUDA_CASES)
def test_triton_matches_float64_reference_cuda(dtype, b, t, h, hk, dh, causal, mask, dropout_p):
    """The compiled kernels (16-bit operand dots, GPU tiles 128×64 / 64×64) against float64 on the GPU."""
    from ckpt_ext.backends.triton import attention as fa

    q, k, v = (x.cuda() for x in make_qkv(b, t, h, hk, dh, dtype=dtype, packed=True))
    m = make_mask(mask, b, h, t, t)
    m = None if m is None else m.cuda()
    dout = torch.randn(b, t, h, dh, dtype=dtype, device="cuda")
    args = (causal, dropout_p, 99, m, dh**-0.5)
    r = run_with_references(fa, dout, q, k, v, *args, same_dtype_reference=False)
    _tolerance_check(r.out, r.o64, r.t_out, floor=1e-5)
    torch.testing.assert_close(r.lse.double(), r.l64, atol=2e-3 if dtype == torch.float32 else 2e-2, rtol=0)
    for ours, ref64, eager in zip(r.grads, r.g64, r.t_grads):
        _tolerance_check(ours, ref64, eager, floor=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_dropout_mask_is_bit_identical():
    """v = one-hot rows per key (dh = S): out reads back P ∘ keep / (1 - p) per (b, i, t, s); its zeros are the
    dropped elements, which must be exactly reference.dropout_keep_mask's over the flat (B, h, T, S) index."""
    from ckpt_ext.backends.triton import attention as fa

    b, t, h, hk = 2, 16, 2, 1
    q, k, _ = make_qkv(b, t, h, hk, 16)
    v = torch.eye(t)[None, :, None, :].expand(b, t, hk, t).contiguous()
    out, _ = fa.gqa_attention_fwd(q, k, v, False, 0.4, 12345, None, 0.25)
    keep = reference.dropout_keep_mask(b * h * t * t, 0.4, 12345).view(b, h, t, t)
    assert torch.equal(out.transpose(1, 2) != 0, keep)
    ref, _ = reference_attention.gqa_attention_fwd(q, k, v, False, 0.4, 12345, None, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_packed_ops_through_triton_backend():
    """GPT-2's packed attention ops run the flash kernels on the triton backend (strided q, k, v views of qkv)."""
    from ckpt_ext.backends.triton import attention as fa

    assert ckpt_ext.backend.impls("triton")["attention_fwd"] is fa.attention_fwd
    b, t, heads, dh = 2, 9, 2, 8
    qkv = torch.randn(b, t, 3 * heads * dh, requires_grad=True)
    mask = make_mask("float_b1ts", b, heads, t, t)
    with ckpt_ext.set_backend("triton"):
        out, lse = ops.attention_fwd(qkv, heads, True, 0.25, 8, mask)
        (dqkv,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    x = qkv.detach().double()
    ref, ref_lse = reference_attention.attention_fwd(x, heads, True, 0.25, 8, mask)
    ref_d = reference_attention.attention_bwd(torch.ones_like(ref), x, ref, ref_lse, heads, True, 0.25, 8, mask)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dqkv.double(), ref_d, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("form", ["transposed", "key_broadcast"])
def test_mask_without_unit_key_stride(form):
    """The kernels take no key stride: a mask whose key stride is not 1 (a transposed view, or a (B, 1, T, 1) mask
    broadcast over keys) is read through the launcher's unit-key-stride copy, against float64 math."""
    from ckpt_ext.backends.triton import attention as fa

    b, t, h, hk, dh = 2, 19, 2, 1, 8
    q, k, v = make_qkv(b, t, h, hk, dh)
    if form == "transposed":
        mask = make_mask("float_b1ts", b, h, t, t).transpose(-1, -2)  # symmetric keep of the diagonal
    else:
        mask = torch.randn(b, 1, t, 1)
    assert mask.stride(-1) != 1 or mask.shape[-1] == 1
    args = (False, 0.2, 5, mask, dh**-0.5)
    dout = torch.randn(b, t, h, dh)
    out, lse = fa.gqa_attention_fwd(q, k, v, *args)
    grads = fa.gqa_attention_bwd(dout, q, k, v, out, lse, *args)
    d = [x.double() for x in (dout, q, k, v)]
    o64, l64 = reference_attention.gqa_attention_fwd(*d[1:], *args)
    g64 = reference_attention.gqa_attention_bwd(d[0], *d[1:], o64, l64, *args)
    torch.testing.assert_close(out.double(), o64, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), l64, atol=1e-5, rtol=0)
    for ours, ref in zip(grads, g64):
        torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


def test_compile_jobs_cover_every_launcher_config(monkeypatch):
    """flash_attention.compile_jobs(90) (the sm_90 compile lane, tests/test_triton_compile.py, which fails on any
    spill) holds every (kernel, tiles, warps, stages, operand dtype) that gpu_tiles can pick on sm_90 for head dims
    1..256, at the heaviest flags (causal, fp32 additive mask, dropout)."""
    from ckpt_ext.backends.triton import attention as fa
    from ckpt_ext.kernels import flash_attention

    monkeypatch.delenv("TRITON_INTERPRET")  # gpu_tiles returns the GPU configs only when not interpreting
    dtypes = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    jobs = set()
    for name, _, sig, const, opts, _ in flash_attention.compile_jobs(90):
        tiles = tuple(const[c] for c in ("BLOCK_M", "BLOCK_N", "BLOCK_D"))
        if const["CAUSAL"] and const["MASK_KIND"] == 2 and const["DROPOUT"] and sig["MASK"] == "*fp32":
            jobs.add((name, sig["Q"], tiles, opts["num_warps"], opts["num_stages"]))
    for name in flash_attention.KERNELS:
        for dh in range(1, fa.MAX_HEAD_DIM + 1):
            for dtype, ptr in dtypes.items():
                tiles, opts = fa.gpu_tiles(name, dh, 90, dtype)
                key = (name, ptr, (tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_D"]), opts["num_warps"],
                       opts["num_stages"])  # fmt: skip
                assert key in jobs, key


@pytest.mark.triton
def test_gpu_attention_bench_plumbing_on_cpu():
    """bench/gpu_attention.py at its tiny CPU shapes (interpreter): every implementation row runs, the segment-id row
    exists for the padding case, and ours match SDPA (unpadded rows for the segment-id row)."""
    from bench import gpu_attention

    rows = gpu_attention.run("cpu")
    impls = {(r["impl"], r["mask"]) for r in rows}
    assert ("ckpt_ext_triton_segments", "padding") in impls and ("ckpt_ext_triton_segments", "none") not in impls
    for r in rows:
        if r["impl"].startswith("ckpt_ext"):
            assert r["status"] == "ok" and r["max_abs_diff_vs_sdpa"] < 1e-5, r
