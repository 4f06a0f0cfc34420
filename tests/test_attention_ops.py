"""ckpt_ext::gqa_attention_fwd / _bwd: reference math against an independent float64 brute force (repeat_kv, full
(B, h, T, S) softmax, reference.dropout_keep_mask over the whole flat index), gradcheck, the cpp backend's routes
against the float64 reference (error at most a few x the reference's own same-dtype error), opcheck, FLOP formulas.
Awkward sizes: T 1/7/33 (and 70 > one 64-row tile), batch 1 and 3, GQA ratios 1, 2, 4."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import ckpt_ext
from ckpt_ext import ops, reference, reference_attention
from ckpt_ext.backends import aten_attention as native_attention

MASKS = [None, "float_b1ts", "bool_1hts", "float_ts", "bool_b11s"]


def make_mask(kind, b, h, t, s, dtype=torch.float32):
    """A mask of the given broadcast form that leaves every row at least one key (the diagonal when S == T)."""
    if kind is None:
        return None
    keep_shape = {"float_b1ts": (b, 1, t, s), "bool_1hts": (1, h, t, s), "float_ts": (t, s), "bool_b11s": (b, 1, 1, s)}
    keep = torch.rand(keep_shape[kind]) > 0.3
    if kind == "bool_b11s":
        keep[..., 0] = True
    else:
        keep |= torch.eye(t, s, dtype=torch.bool)
    if kind.startswith("bool"):
        return keep
    return torch.randn(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))


def make_qkv(b, t, h, hk, dh, s=None, dtype=torch.float32, packed=False):
    """q (B, T, h, dh), k, v (B, S, hk, dh); packed: strided views of one (B, T, (h + 2·hk)·dh) projection."""
    s = t if s is None else s
    if packed:
        assert s == t
        qkv = torch.randn(b, t, h + 2 * hk, dh, dtype=dtype)
        return qkv[:, :, :h], qkv[:, :, h : h + hk], qkv[:, :, h + hk :]
    return tuple(torch.randn(b, n, heads, dh, dtype=dtype) for n, heads in ((t, h), (s, hk), (s, hk)))


def brute_force(q, k, v, causal, dropout_p, seed, mask, scale, dtype=torch.float64):
    """Plain PyTorch attention in ``dtype`` (float64: the exact math) with k/v repeated per head and the whole
    (B, h, T, S) probability matrix; differentiable (PyTorch's own same-dtype error when dtype is not float64)."""
    b, t, h, dh = q.shape
    g = h // k.shape[2]
    kr, vr = (x.to(dtype).repeat_interleave(g, dim=2) for x in (k, v))
    s = torch.einsum("bthd,bshd->bhts", q.to(dtype), kr) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(dtype)
    if causal:
        s = s.masked_fill(torch.ones(t, s.shape[-1], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    if dropout_p > 0:
        keep = reference.dropout_keep_mask(p.numel(), dropout_p, seed, p.device).view(p.shape)
        p = torch.where(keep, p / (1 - dropout_p), 0.0)
    return torch.einsum("bhts,bshd->bthd", p, vr), torch.logsumexp(s, dim=-1)


def torch_same_dtype(dout, q, k, v, *args):
    """PyTorch eager attention in q.dtype: out, lse and dq, dk, dv by autograd."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, lse = brute_force(*leaves, *args, dtype=q.dtype)
    return out, lse, torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("b, t, h, hk", [(1, 1, 2, 1), (3, 7, 4, 2), (2, 33, 4, 1), (1, 7, 3, 3)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_reference_matches_brute_force(causal, mask, b, t, h, hk, dropout_p):
    q, k, v = make_qkv(b, t, h, hk, 8, dtype=torch.float64)
    m = make_mask(mask, b, h, t, t, torch.float64)
    out, lse = reference_attention.gqa_attention_fwd(q, k, v, causal, dropout_p, 11, m, 0.37)
    ref_out, ref_lse = brute_force(q, k, v, causal, dropout_p, 11, m, 0.37)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_reference_cross_attention_s_differs_from_t():
    q, k, v = make_qkv(3, 5, 4, 2, 8, s=9, dtype=torch.float64)
    m = make_mask("float_b1ts", 3, 4, 5, 9, torch.float64)
    out, lse = reference_attention.gqa_attention_fwd(q, k, v, False, 0.2, 3, m, 0.5)
    ref_out, ref_lse = brute_force(q, k, v, False, 0.2, 3, m, 0.5)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


GRADCHECK_CASES = [
    (True, 0.0, None, 1),
    (False, 0.3, "float_b1ts", 2),
    (True, 0.2, "bool_1hts", 1),
    (False, 0.0, "float_ts", 4),
]


@pytest.mark.parametrize("causal, dropout_p, mask, hk", GRADCHECK_CASES)
def test_gradcheck_float64(causal, dropout_p, mask, hk):
    """The op's autograd (gqa_attention_bwd) is the exact VJP of its forward, GQA sums included."""
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 5, 4, hk, 3, dtype=torch.float64))
    m = make_mask(mask, 2, 4, 5, 5, torch.float64)
    with ckpt_ext.set_backend("reference"):
        fn = lambda q, k, v: ops.gqa_attention_fwd(q, k, v, causal, dropout_p, 9, m, 0.6)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v))


def run_with_references(impl, dout, q, k, v, *args, same_dtype_reference=True):
    """impl's gqa_attention_fwd / _bwd on (q, k, v) and the computations it is judged against, as a namespace: ours
    (out, lse, grads), PyTorch eager in q.dtype (t_out, t_lse, t_grads), the float64 reference (o64, l64, g64) and,
    when same_dtype_reference, reference_attention in q.dtype (r_out, r_lse, r_grads)."""
    r = SimpleNamespace()
    r.out, r.lse = impl.gqa_attention_fwd(q, k, v, *args)
    r.grads = impl.gqa_attention_bwd(dout, q, k, v, r.out, r.lse, *args)
    if same_dtype_reference:
        r.r_out, r.r_lse = reference_attention.gqa_attention_fwd(q, k, v, *args)
        r.r_grads = reference_attention.gqa_attention_bwd(dout, q, k, v, r.r_out, r.r_lse, *args)
    r.t_out, r.t_lse, r.t_grads = torch_same_dtype(dout, q, k, v, *args)
    d = [x.double() for x in (dout, q, k, v)]
    r.o64, r.l64 = reference_attention.gqa_attention_fwd(*d[1:], *args)
    r.g64 = reference_attention.gqa_attention_bwd(d[0], *d[1:], r.o64, r.l64, *args)
    return r


def _tolerance_check(ours, ref64, *same_dtype, factor=3.0, floor=1e-6):
    """max |ours - ref64| <= factor · (same-dtype error) + floor; the same-dtype error is the largest of the given
    same-dtype computations' (our reference math, PyTorch's eager math in that dtype)."""
    err = (ours.double() - ref64).abs().max().item()
    base = max((x.double() - ref64).abs().max().item() for x in same_dtype)
    assert err <= factor * base + floor, (err, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout_p, mask", [(0.0, None), (0.3, None), (0.0, "float_b1ts"), (0.2, "bool_b11s")])
@pytest.mark.parametrize("b, t, h, hk", [(3, 7, 4, 2), (1, 70, 2, 1)])
def test_cpp_routes_match_float64_reference(dtype, causal, dropout_p, mask, b, t, h, hk):
    """native_attention (fp32 without mask or dropout: ckpt_ext._C's cpu_gqa kernels; cpu_flash without dropout when the
    mask is bool or q's dtype; tiled cpu_math otherwise; T=70 spans two 64-row tiles)."""
    q, k, v = make_qkv(b, t, h, hk, 16, dtype=dtype, packed=True)
    m = make_mask(mask, b, h, t, t)
    dout = torch.randn(b, t, h, 16, dtype=dtype)
    args = (causal, dropout_p, 5, m, 0.25)
    route = native_attention._route_gqa(q, k, v, dropout_p, m)
    if dropout_p == 0 and m is None and dtype == torch.float32:
        assert route == "cpu_gqa"
    else:
        flash = dropout_p == 0 and (m is None or m.dtype in (torch.bool, dtype))
        assert route == ("cpu_flash" if flash else "cpu_math")
    r = run_with_references(native_attention, dout, q, k, v, *args)
    assert r.out.dtype == dtype and r.out.is_contiguous() and r.lse.dtype == torch.float32
    _tolerance_check(r.out, r.o64, r.r_out, r.t_out)
    _tolerance_check(r.lse, r.l64, r.r_lse, r.t_lse, floor=1e-5)
    for ours, ref64, ref, eager in zip(r.grads, r.g64, r.r_grads, r.t_grads):
        assert ours.dtype == dtype and ours.shape == ref.shape and ours.is_contiguous()
        _tolerance_check(ours, ref64, ref, eager, floor=1e-5)


@pytest.mark.parametrize("seed", [0, 77, 2**40 + 3])
def test_cpp_tiled_dropout_mask_is_the_reference_mask(seed):
    """The int32 hash of the tiled route keeps exactly reference.dropout_keep_mask's elements, tile by tile."""
    b, h, t, s, g = 2, 4, 70, 9, 2
    full = reference.dropout_keep_mask(b * h * t * s, 0.4, seed).view(b, h, t, s)
    for j in range(h // g):
        for t0 in (0, 64):
            t1 = min(t, t0 + 64)
            for n in (s, 5):  # every key, or the first n (a causal tile)
                tile = native_attention._tile_keep((b, h, t, s), j, g, t0, t1, n, 0.4, seed, "cpu")
                assert torch.equal(tile, full[:, j * g : (j + 1) * g, t0:t1, :n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 77, 2**40 + 3])
def test_cpp_tile_dropout_kernel_is_the_reference_mask(dtype, seed):
    """ckpt_ext._C's attention_tile_dropout_kernel (what the tiled route runs when the extension is built) scales
    exactly the reference mask's kept elements of each tile by 1 / (1 - p) and zeroes the rest, in place; the
    fallback emulation (_tile_dropout_ without the kernel) gives the very same tile."""
    b, h, t, s, g, p = 2, 4, 70, 9, 2, 0.4
    kernel = native_attention._tile_dropout_kernel("cpu")
    assert kernel is not None  # the extension is part of this project's test environment
    full = reference.dropout_keep_mask(b * h * t * s, p, seed).view(b, h, t, s)
    for j in range(h // g):
        for t0 in (0, 64):
            t1 = min(t, t0 + 64)
            for n in (s, 5):
                x = torch.rand(b, g, t1 - t0, n, dtype=dtype) + 0.5
                ours = x.clone()
                native_attention._tile_dropout_(ours, (b, h, t, s), j, g, t0, t1, n, p, seed)
                keep = full[:, j * g : (j + 1) * g, t0:t1, :n]
                torch.testing.assert_close(ours, torch.where(keep, x * (1.0 / (1.0 - p)), 0.0), rtol=0, atol=0)
                emulated = native_attention._drop_(x.clone(), native_attention._tile_keep(
                    (b, h, t, s), j, g, t0, t1, n, p, seed, "cpu"), p)  # fmt: skip
                torch.testing.assert_close(ours, emulated, rtol=0, atol=0)


def test_cpp_tile_dropout_kernel_rejects_bad_tiles():
    kernel = native_attention._tile_dropout_kernel("cpu")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        kernel(torch.ones(1, 1, 2, 2, dtype=torch.bfloat16), 1, 2, 2, 0, 0, 0.1, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel(torch.ones(1, 1, 2, 4)[..., ::2], 1, 2, 4, 0, 0, 0.1, 0)
    with pytest.raises(RuntimeError, match="inside"):
        kernel(torch.ones(1, 2, 2, 2), 2, 2, 2, 1, 0, 0.1, 0)  # heads 1..2 of 2
    with pytest.raises(RuntimeError, match="p must be"):
        kernel(torch.ones(1, 1, 2, 2), 1, 2, 2, 0, 0, 1.0, 0)


def test_packed_ops_equal_gqa_ops_on_views():
    """attention_fwd/_bwd on packed qkv are the gqa ops on its q, k, v views with scale 1/sqrt(dh)."""
    b, t, heads, dh = 3, 7, 2, 4
    qkv = torch.randn(b, t, 3 * heads * dh, dtype=torch.float64)
    mask = make_mask("float_b1ts", b, heads, t, t, torch.float64)
    out, lse = reference_attention.attention_fwd(qkv, heads, True, 0.3, 4, mask)
    q, k, v = qkv.view(b, t, 3, heads, dh).unbind(2)
    ref_out, ref_lse = brute_force(q, k, v, True, 0.3, 4, mask, dh**-0.5)
    torch.testing.assert_close(out, ref_out.reshape(b, t, -1))
    torch.testing.assert_close(lse, ref_lse)


def _opcheck_calls():
    q, k, v = make_qkv(3, 7, 4, 2, 8, packed=True)
    q1, k1, v1 = make_qkv(1, 5, 2, 1, 4, s=6)
    out, lse = reference_attention.gqa_attention_fwd(q, k, v, True, 0.0, 0, None, 0.35)
    mask = make_mask("float_b1ts", 3, 4, 7, 7)
    return [
        (ops.gqa_attention_fwd, (q, k, v, True, 0.0, 0, None, 0.35)),
        (ops.gqa_attention_fwd, (q, k, v, False, 0.25, 5, mask, 0.35)),
        (ops.gqa_attention_fwd, (q1, k1, v1, False, 0.0, 0, make_mask("bool_b11s", 1, 2, 5, 6), 0.5)),
        (ops.gqa_attention_bwd, (torch.randn(3, 7, 4, 8), q, k, v, out, lse, True, 0.0, 0, None, 0.35)),
        (ops.gqa_attention_bwd, (torch.randn(3, 7, 4, 8), q, k, v, out, lse, False, 0.25, 5, mask, 0.35)),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    with ckpt_ext.set_backend(backend):
        for op, args in _opcheck_calls():
            args = tuple(a.detach().requires_grad_(requires_grad) if i < 3 and op is ops.gqa_attention_fwd else a
                         for i, a in enumerate(args))  # fmt: skip
            torch.library.opcheck(op, args)


def test_flop_formulas():
    b, t, s, h, hk, dh = 2, 7, 9, 4, 2, 8
    q, k, v = (x.requires_grad_() for x in make_qkv(b, t, h, hk, dh, s=s))
    with FlopCounterMode(display=False) as counter:
        ops.gqa_attention_fwd(q, k, v, False, 0.0, 0, None, 0.3)[0].sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.ckpt_ext.gqa_attention_fwd] == 4 * b * h * t * s * dh
    assert counts[torch.ops.ckpt_ext.gqa_attention_bwd] == 10 * b * h * t * s * dh


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_torch_compile_fullgraph_equals_eager(backend):
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 7, 4, 2, 8))
    mask = make_mask("float_b1ts", 2, 4, 7, 7)

    def loss(q, k, v):
        return ops.gqa_attention_fwd(q, k, v, True, 0.1, 3, mask, 0.3)[0].square().sum()

    with ckpt_ext.set_backend(backend):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k, v)
        eager = loss(q, k, v)
        torch.testing.assert_close(compiled, eager)
        for a, b in zip(torch.autograd.grad(compiled, (q, k, v)), torch.autograd.grad(eager, (q, k, v))):
            torch.testing.assert_close(a, b)
