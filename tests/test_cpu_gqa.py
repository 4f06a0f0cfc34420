"""ckpt_ext._C's CPU attention kernels (csrc/cpu/attention_cpu.cpp; aten_attention's ``cpu_gqa`` route): forward and
backward against float64 math within a few x PyTorch's own fp32 error, on awkward shapes: T 1/7/33/70/130 (one,
several and ragged tiles of min(64, 128 / G) rows), head_dim 8/40/72, GQA ratios 1/2/4/h, batch 1 and 3, strided
(packed-projection) inputs, non-causal T != S, a long key axis that shrinks the tile below 64 rows, and backward's
split of query tiles into chunks whose dk/dv partials are added afterwards. Also: the route taken, opcheck on both
helper ops, bitwise equality across thread counts, segment ids (packed runs, scattered ids, all padding;
int32/int64), the aten flash fallback for long keys, and a block step through it."""

import platform
import sys

import pytest
import torch
from test_attention_ops import brute_force, make_qkv

import ckpt_ext
from ckpt_ext import reference_attention
from ckpt_ext.backends import aten_attention as native_attention
from ckpt_ext.backends.cpp import bridge as cpp_bridge  # noqa: F401  (loads ckpt_ext._C and the fakes)

# torch's x86-64 Linux wheels carry MKL's sgemm_ in libtorch_cpu: there the kernels must be available (a test below
# fails otherwise); elsewhere a build without it routes to aten's flash kernel and these tests skip, saying why.
X86_LINUX = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
pytestmark = pytest.mark.skipif(
    not X86_LINUX and not native_attention._cpu_gqa_available(),
    reason="no BLAS sgemm_ in this torch build's libtorch_cpu (the cpu_gqa route is then unused)",
)
OPS = torch.ops.ckpt_ext


def _check(ours, ref64, same_dtype, factor=4.0, floor=2e-6):
    """max |ours - ref64| <= factor · PyTorch's own fp32 error + floor, worst element printed on failure."""
    tol = factor * (same_dtype.double() - ref64).abs().max().item() + floor
    torch.testing.assert_close(ours.double(), ref64, rtol=0.0, atol=tol)


def _run_case(q, k, v, causal, scale):
    dout = torch.randn(q.shape)
    out, lse = OPS.cpu_gqa_attention_fwd(q, k, v, causal, scale, None)
    dq, dk, dv = OPS.cpu_gqa_attention_bwd(dout, q, k, v, out, lse, causal, scale, None)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o64, l64 = brute_force(*leaves64, causal, 0.0, 0, None, scale)
    g64 = torch.autograd.grad(o64, leaves64, dout.double())
    leaves32 = [x.detach().requires_grad_() for x in (q, k, v)]
    o32, l32 = brute_force(*leaves32, causal, 0.0, 0, None, scale, dtype=torch.float32)
    g32 = torch.autograd.grad(o32, leaves32, dout)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    _check(out, o64.detach(), o32)
    _check(lse, l64.detach(), l32, floor=1e-5)
    for ours, ref, same in zip((dq, dk, dv), g64, g32):
        _check(ours, ref, same)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b, t, h, hk, dh", [(1, 1, 2, 1, 8), (3, 7, 4, 2, 40), (3, 33, 4, 4, 72), (1, 70, 4, 1, 16),
                                             (1, 130, 2, 2, 8), (3, 33, 6, 3, 8), (2, 9, 4, 2, 3),
                                             (1, 33, 2, 1, 13)])  # fmt: skip
@pytest.mark.parametrize("packed", [False, True])
def test_matches_float64(causal, b, t, h, hk, dh, packed):
    torch.manual_seed(t * 7 + h)
    q, k, v = make_qkv(b, t, h, hk, dh, packed=packed)
    _run_case(q, k, v, causal, dh**-0.5)


def _layouts(kind):
    """(q, k, v) whose k/v row stride is not a usable BLAS leading dimension, or is transposed storage."""
    if kind == "expanded_over_s":  # stride 0 along S
        q = torch.randn(2, 9, 4, 5)
        return q, torch.randn(2, 1, 2, 5).expand(2, 9, 2, 5), torch.randn(2, 1, 2, 5).expand(2, 9, 2, 5)
    if kind == "one_key_stride_1":  # S == 1 stored with stride 1 (is_contiguous() is True, .contiguous() keeps it)
        kv = [torch.randn(1, 1, 8, 1).permute(0, 3, 1, 2) for _ in range(2)]  # (1, 1, 1, 8), strides (8, 1, 8, 1)
        return torch.randn(1, 3, 2, 8), *kv
    q, k, v = (torch.randn(2, heads, 33, 8).transpose(1, 2) for heads in (4, 2, 2))  # (B, T, h, dh) of (B, h, T, dh)
    return q, k, v


@pytest.mark.parametrize("kind", ["expanded_over_s", "one_key_stride_1", "head_major"])
def test_awkward_layouts(kind, capfd):
    """k/v that sgemm cannot read in place are copied first; the BLAS reports no parameter error."""
    torch.manual_seed(5)
    q, k, v = _layouts(kind)
    _run_case(q, k, v, False, 0.4)
    assert "ERROR" not in "".join(capfd.readouterr())


def test_causal_ids_with_shrunk_tiles():
    """24 query heads on one kv head at T = S = 301: tiles of 128 // 24 = 5 rows (the last one ragged), causal,
    packed ids with padding between the sequences."""
    torch.manual_seed(6)
    q, k, v = make_qkv(1, 301, 24, 1, 8)
    ids = torch.tensor([1] * 100 + [0] * 7 + [2] * 194).view(1, 301)
    dout = torch.randn(q.shape)
    out, lse = OPS.cpu_gqa_attention_fwd(q, k, v, True, 0.3, ids)
    grads = OPS.cpu_gqa_attention_bwd(dout, q, k, v, out, lse, True, 0.3, ids)
    args = (True, 0.0, 0, None, 0.3, ids)
    d64 = [x.double() for x in (dout, q, k, v)]
    o64, l64 = reference_attention.gqa_attention_fwd(*d64[1:], *args)
    g64 = reference_attention.gqa_attention_bwd(d64[0], *d64[1:], o64, l64, *args)
    torch.testing.assert_close(out.double(), o64, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), l64, rtol=0, atol=2e-5)
    for ours, ref in zip(grads, g64):
        torch.testing.assert_close(ours.double(), ref, rtol=0, atol=5e-5)


def test_noncausal_long_keys_shrink_the_tile():
    """G · S large: 64 heads on one kv head against 4100 keys gives tiles of 2 query rows (ragged last tile)."""
    torch.manual_seed(1)
    q, k, v = make_qkv(1, 21, 64, 1, 8, s=4100)
    _run_case(q, k, v, False, 0.3)


def test_available_on_x86_linux():
    """The route is this project's CPU attention on its build machines: finding no sgemm_ there is a failure."""
    if not X86_LINUX:
        pytest.skip("torch's x86-64 Linux wheels are where sgemm_ is known to be in libtorch_cpu")
    assert native_attention._cpu_gqa_available()


@pytest.mark.parametrize("with_ids", [False, True])
def test_threads_do_not_change_bits(with_ids):
    """Work splits depend on shapes only: one and two threads give the same bits (backward splits (b, g) pairs into
    query-tile chunks here, B · hk = 2 < 32)."""
    torch.manual_seed(2)
    q, k, v = make_qkv(1, 150, 4, 2, 16)
    ids = _ids("packed", 1, 150) if with_ids else None
    dout = torch.randn(q.shape)
    results = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, lse = OPS.cpu_gqa_attention_fwd(q, k, v, True, 0.25, ids)
            results.append((out, lse, *OPS.cpu_gqa_attention_bwd(dout, q, k, v, out, lse, True, 0.25, ids)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _ids(kind, b, t):
    """segment_ids (B, T): packed runs with padding between and after them, random interleaved ids (each row sees a
    scattered set of keys), or all padding (every row empty)."""
    if kind == "packed":
        row = torch.tensor(([1] * 3 + [2] * 2 + [0] + [3] * 60 + [4] * 70 + [0] * max(3, t - 136))[:t])
        return torch.stack([row, torch.cat([torch.zeros(3, dtype=torch.int64), torch.full((t - 3,), 7)])][:b])
    if kind == "random":
        return torch.randint(0, 3, (b, t))
    return torch.zeros(b, t, dtype=torch.int64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["packed", "random", "padding"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("b, t, h, hk", [(2, 130, 4, 2), (1, 33, 2, 1)])
def test_segment_ids_match_float64(causal, kind, id_dtype, b, t, h, hk):
    """Key padding and packed sequences read from segment_ids in the kernel (each tile's key window is the span of its
    rows' segments): against float64 reference math with the same ids; empty rows give 0 / -inf / zero gradients."""
    torch.manual_seed(t + h)
    q, k, v = make_qkv(b, t, h, hk, 16)
    ids = _ids(kind, b, t).to(id_dtype)
    dout, scale = torch.randn(q.shape), 0.3
    out, lse = OPS.cpu_gqa_attention_fwd(q, k, v, causal, scale, ids)
    grads = OPS.cpu_gqa_attention_bwd(dout, q, k, v, out, lse, causal, scale, ids)
    args = (causal, 0.0, 0, None, scale, ids)
    o32, l32 = reference_attention.gqa_attention_fwd(q, k, v, *args)
    g32 = reference_attention.gqa_attention_bwd(dout, q, k, v, o32, l32, *args)
    d64 = [x.double() for x in (dout, q, k, v)]
    o64, l64 = reference_attention.gqa_attention_fwd(*d64[1:], *args)
    g64 = reference_attention.gqa_attention_bwd(d64[0], *d64[1:], o64, l64, *args)
    empty = torch.isinf(l64)
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] < 0).all())
    _check(out, o64, o32)
    _check(lse.masked_fill(empty, 0), l64.masked_fill(empty, 0), l32.masked_fill(empty, 0), floor=1e-5)
    for ours, ref, same in zip(grads, g64, g32):
        _check(ours, ref, same)
    if kind == "padding":
        assert not out.any() and not any(g.any() for g in grads)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_ids", [False, True])
def test_opcheck(causal, with_ids):
    q, k, v = make_qkv(2, 9, 4, 2, 8)
    ids = torch.tensor([[1] * 4 + [2] * 5, [0] * 2 + [3] * 7], dtype=torch.int32) if with_ids else None
    out, lse = OPS.cpu_gqa_attention_fwd(q, k, v, causal, 0.35, ids)
    torch.library.opcheck(OPS.cpu_gqa_attention_fwd.default, (q, k, v, causal, 0.35, ids))
    dout = torch.randn(q.shape)
    torch.library.opcheck(OPS.cpu_gqa_attention_bwd.default, (dout, q, k, v, out, lse, causal, 0.35, ids))


def test_bad_input_is_refused():
    q, k, v = make_qkv(1, 5, 4, 2, 8)
    with pytest.raises(RuntimeError, match="multiple of k's"):
        three = torch.randn(1, 5, 3, 8)
        OPS.cpu_gqa_attention_fwd(q, three, three, True, 1.0, None)
    with pytest.raises(RuntimeError, match="float32"):
        OPS.cpu_gqa_attention_fwd(q.double(), k.double(), v.double(), True, 1.0, None)
    with pytest.raises(RuntimeError, match="causal needs S == T"):
        OPS.cpu_gqa_attention_fwd(q, k[:, :4], v[:, :4], True, 1.0, None)
    with pytest.raises(RuntimeError, match="segment_ids must be \\(B, S\\)"):
        OPS.cpu_gqa_attention_fwd(q, k, v, True, 1.0, torch.ones(1, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="segment_ids must be an int32/int64"):
        OPS.cpu_gqa_attention_fwd(q, k, v, True, 1.0, torch.ones(1, 5))


@pytest.mark.parametrize(
    "dtype, mask, ids, dropout_p, long_keys, expected",
    [(torch.float32, False, False, 0.0, False, "cpu_gqa"), (torch.float32, False, True, 0.0, False, "cpu_gqa"),
     (torch.bfloat16, False, False, 0.0, False, "cpu_flash"), (torch.float64, False, True, 0.0, False, "cpu_flash"),
     (torch.float32, True, False, 0.0, False, "cpu_flash"), (torch.float32, True, True, 0.0, False, "cpu_flash"),
     (torch.float32, False, False, 0.1, False, "cpu_math"), (torch.float32, False, False, 0.0, True, "cpu_flash")],
)  # fmt: skip
def test_route(dtype, mask, ids, dropout_p, long_keys, expected, monkeypatch):
    if long_keys:
        monkeypatch.setattr(native_attention, "CPU_GQA_MAX_KEYS", 6)
    q, k, v = make_qkv(1, 7, 2, 1, 8, dtype=dtype)
    m = torch.ones(7, 7, dtype=torch.bool) if mask else None
    seg = torch.ones(1, 7, dtype=torch.int32) if ids else None
    assert native_attention._route_gqa(q, k, v, dropout_p, m, seg) == expected


def test_long_keys_fall_back_to_aten_flash(monkeypatch):
    """Past CPU_GQA_MAX_KEYS the route is aten's flash kernel: the same answers within fp32 rounding."""
    torch.manual_seed(3)
    q, k, v = make_qkv(2, 40, 4, 2, 8)
    dout = torch.randn(q.shape)
    ours = native_attention.gqa_attention_fwd(q, k, v, True, 0.0, 0, None, 0.3)
    grads = native_attention.gqa_attention_bwd(dout, q, k, v, *ours, True, 0.0, 0, None, 0.3)
    monkeypatch.setattr(native_attention, "CPU_GQA_MAX_KEYS", 39)
    flash = native_attention.gqa_attention_fwd(q, k, v, True, 0.0, 0, None, 0.3)
    flash_grads = native_attention.gqa_attention_bwd(dout, q, k, v, *flash, True, 0.0, 0, None, 0.3)
    for a, b in zip((*ours, *grads), (*flash, *flash_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_llama_block_takes_the_route():
    """A Llama-form block on the cpp backend runs its attention through cpu_gqa (forward, the block policy's
    recompute, backward) and matches the reference backend."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(4)
    blk = ckpt_ext.FusedCheckpointBlock(48, 4, activation="swiglu", n_kv_heads=2, d_ff=80, policy="block")
    x = torch.randn(2, 9, 48, requires_grad=True)
    results = {}
    for name in ("cpp", "reference"):
        blk.zero_grad()
        x.grad = None
        with ckpt_ext.set_backend(name), profile(activities=[ProfilerActivity.CPU]) as prof:
            out = blk(x)
            out.square().sum().backward()
        results[name] = (out, x.grad, *(p.grad for p in blk.parameters()))
        counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("ckpt_ext::cpu_gqa_attention")}
        expected = {"ckpt_ext::cpu_gqa_attention_fwd": 2, "ckpt_ext::cpu_gqa_attention_bwd": 1} if name == "cpp" else {}
        assert counts == expected
    for a, b in zip(results["cpp"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
