"""The C++ CPU kernels of the Llama-family ops (csrc/cpu: rms_norm, swiglu, rope, the matmul-fused SwiGLU ops and the
gated GeGLU of Gemma / ModernBERT)
against ckpt_ext.reference: float64 end to end (tight), fp32/bf16 against float64 math within a few times the error of
the reference run in the same dtype, awkward shapes (d 72/200/1000, N 1/7/33, F odd), strided inputs (transposed
weights, q/k as views of a packed projection), mixed dtypes (an fp32 RMSNorm weight with bf16 activations, as under
autocast), dweight independent of the thread count, fresh outputs, clear errors, opcheck on every kernel op.
"""

import pytest
import torch

import ckpt_ext
from ckpt_ext import reference
from ckpt_ext.backends.cpp import (
    bridge as cpp_bridge,  # loads ckpt_ext._C: a missing extension fails this file, never skips it
)

K = torch.ops.ckpt_ext
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
RMS_DTYPES = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]  # x, weight (None: x's)
LLAMA_OPS = [
    "rms_norm_fwd",
    "rms_norm_bwd",
    "swiglu_fwd",
    "swiglu_bwd",
    "linear_swiglu",
    "swiglu_linear_bwd",
    "swiglu_linear_wgrad",
    "swiglu_ffn_recompute",
    "rope",
    "geglu_fwd",
    "geglu_bwd",
]


def _up(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _check(fn, kernel, args, dtype, factor=3.0):
    """Each output of kernel(*args): reference's dtype and shape, and max |ours - ref64| <= factor * max |ref - ref64|
    + atol, where ref is the reference run on args and ref64 on float64 copies of them."""
    ours, ref, ref64 = kernel(*args), fn(*args), fn(*_up(args))
    ours, ref, ref64 = [(t,) if isinstance(t, torch.Tensor) else t for t in (ours, ref, ref64)]
    for o, r, r64 in zip(ours, ref, ref64):
        assert o.dtype == r.dtype and o.shape == r.shape and o.is_contiguous()
        if o.numel() == 0:
            continue
        err = (r.double() - r64).abs().max().item()
        torch.testing.assert_close(o.double(), r64, atol=factor * err + ATOL[dtype], rtol=0)


def _check64(fn, kernel, args):
    """float64 end to end: the kernel equals the reference to rounding."""
    args = _up(args)
    ours, ref = kernel(*args), fn(*args)
    ours, ref = [(t,) if isinstance(t, torch.Tensor) else t for t in (ours, ref)]
    for o, r in zip(ours, ref):
        assert o.dtype == r.dtype == torch.float64 or o.numel() == 0
        torch.testing.assert_close(o, r, atol=1e-12, rtol=1e-11)


def _rms_inputs(n, d, dtype, wdtype=None):
    x = (torch.randn(n, d) * 2 + 0.3).to(dtype)
    w = (1 + 0.5 * torch.randn(d)).to(wdtype or dtype)
    return x, w


# ---------------------------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("n, d", [(1, 72), (7, 200), (33, 1000)])
@pytest.mark.parametrize("dtype, wdtype", RMS_DTYPES)
def test_rms_norm_fwd(n, d, dtype, wdtype):
    x, w = _rms_inputs(n, d, dtype, wdtype)
    _check(reference.rms_norm_fwd, K.rms_norm_fwd_kernel, (x, w, 1e-6), dtype)
    _check64(reference.rms_norm_fwd, K.rms_norm_fwd_kernel, (x, w, 1e-6))


@pytest.mark.parametrize("n, d", [(1, 72), (7, 200), (33, 1000)])
@pytest.mark.parametrize("dtype, wdtype", RMS_DTYPES)
@pytest.mark.parametrize("residual, emit_y", [(False, False), (True, True)])
def test_rms_norm_bwd(n, d, dtype, wdtype, residual, emit_y):
    x, w = _rms_inputs(n, d, dtype, wdtype)
    y, rstd = reference.rms_norm_fwd(x, w, 1e-6)
    dy = torch.randn(n, d).to(y.dtype)  # the forward output's dtype (fp32 for an fp32 weight with bf16 x)
    dres = torch.randn(n, d).to(dtype) if residual else None
    # dweight sums N rows of bf16-rounded products: allow the larger factor there.
    _check(reference.rms_norm_bwd, K.rms_norm_bwd_kernel, (dy, x, rstd, w, dres, emit_y), dtype, factor=4.0)
    _check64(reference.rms_norm_bwd, K.rms_norm_bwd_kernel, (dy, x, rstd, w, dres, emit_y))


def test_rms_norm_bwd_strided_and_mixed_dtypes():
    x, w = _rms_inputs(33, 80, torch.bfloat16)
    _, rstd = reference.rms_norm_fwd(x, w, 1e-6)
    dy = torch.randn(80, 33).t()  # float32, transposed
    dres = torch.randn(33, 80)  # float32 residual gradient
    _check(reference.rms_norm_bwd, K.rms_norm_bwd_kernel, (dy, x, rstd, w, dres, True), torch.bfloat16, factor=4.0)


def test_rms_norm_per_head_view():
    """Qwen3's q/k norm: x (N, heads, head_dim) viewed (N * heads, head_dim), one weight shared by all heads."""
    q = torch.randn(7, 5, 3, 64).bfloat16()
    w = torch.randn(64).bfloat16()
    rows = q.reshape(-1, 64)
    _check(reference.rms_norm_fwd, K.rms_norm_fwd_kernel, (rows, w, 1e-6), torch.bfloat16)


def test_rms_norm_dweight_is_bitwise_independent_of_threads():
    x, w = _rms_inputs(1000, 200, torch.float32)
    _, rstd = reference.rms_norm_fwd(x, w, 1e-6)
    dy = torch.randn(1000, 200)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 1, 2):
            torch.set_num_threads(t)
            outs.append(K.rms_norm_bwd_kernel(dy, x, rstd, w, None, False)[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_rms_norm_errors_name_the_argument():
    x, w = _rms_inputs(4, 8, torch.float32)
    with pytest.raises(RuntimeError, match="weight"):
        K.rms_norm_fwd_kernel(x, torch.ones(9), 1e-6)
    with pytest.raises(RuntimeError, match="rstd"):
        K.rms_norm_bwd_kernel(x, x, torch.ones(5), w, None, False)
    with pytest.raises(RuntimeError, match="dresidual"):
        K.rms_norm_bwd_kernel(x, x, torch.ones(4), w, torch.ones(4, 9), False)


# ------------------------------------------------------------------------------------------ SwiGLU and GeGLU
# One gated implementation serves both (csrc/cpu/gated_cpu.cpp): h = gate(g) u, gate = silu / tanh-form gelu.
GATED = ["swiglu", "geglu"]


def _gu(n, f, dtype):
    return (torch.randn(n, f) * 3).to(dtype), torch.randn(n, f).to(dtype)


def _gated(op):
    """(reference fwd, reference bwd, kernel fwd, kernel bwd) of op "swiglu" or "geglu"."""
    refs = getattr(reference, f"{op}_fwd"), getattr(reference, f"{op}_bwd")
    return (*refs, getattr(K, f"{op}_fwd_kernel"), getattr(K, f"{op}_bwd_kernel"))


@pytest.mark.parametrize("op", GATED)
@pytest.mark.parametrize("n, f", [(1, 37), (7, 101), (33, 256), (1, 72), (7, 200), (33, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated(op, n, f, dtype):
    ref_fwd, ref_bwd, fwd, bwd = _gated(op)
    g, u = _gu(n, f, dtype)
    dh = torch.randn(n, f).to(dtype)
    _check(ref_fwd, fwd, (g, u), dtype)
    _check(ref_bwd, bwd, (dh, g, u), dtype)
    _check64(ref_fwd, fwd, (g, u))
    _check64(ref_bwd, bwd, (dh, g, u))


@pytest.mark.parametrize("op", GATED)
def test_gated_strided_mixed_dtypes_and_extremes(op):
    ref_fwd, ref_bwd, fwd, bwd = _gated(op)
    g, u = _gu(7, 45, torch.bfloat16)
    g[0, :4] = torch.tensor([-200.0, 200.0, -1e4, 1e4])  # the gate saturates: finite, no NaN
    dh = torch.randn(45, 7).t()  # float32 upstream gradient, transposed
    _check(ref_bwd, bwd, (dh, g, u.float()), torch.bfloat16)
    _check(ref_fwd, fwd, (g, u.float()), torch.bfloat16)
    assert bwd(dh, g, u.float())[1].dtype == torch.float32  # du in u's dtype
    assert all(t.isfinite().all() for t in bwd(dh, g, u))


def test_geglu_is_the_tanh_gelu():
    """Against torch's own gelu(approximate="tanh") in float64 (not the exact erf GELU: they differ by ~1e-3)."""
    g, u = (torch.randn(7, 200, dtype=torch.float64) * 3 for _ in range(2))
    want = torch.nn.functional.gelu(g, approximate="tanh") * u
    torch.testing.assert_close(K.geglu_fwd_kernel(g, u), want, atol=1e-12, rtol=1e-11)
    assert (K.geglu_fwd_kernel(g, u) - torch.nn.functional.gelu(g) * u).abs().max() > 1e-4


def test_geglu_errors_name_the_argument():
    with pytest.raises(RuntimeError, match="geglu_fwd_kernel: g and u"):
        K.geglu_fwd_kernel(torch.randn(3, 5), torch.randn(3, 6))
    with pytest.raises(RuntimeError, match="geglu_bwd_kernel: dh"):
        K.geglu_bwd_kernel(torch.randn(3, 6), torch.randn(3, 5), torch.randn(3, 5))


def test_geglu_graph_ops_on_cpp_backend_run_the_kernels():
    """Under the cpp backend the dispatch table gives the C++ kernel ops (not the reference fallback), and the graph
    ops' results are theirs."""
    g, u = _gu(7, 72, torch.float32)
    dh = torch.randn(7, 72)
    with ckpt_ext.set_backend("cpp"):
        table = ckpt_ext.backend.kernel_table("cpu")
        assert table["geglu_fwd"] is K.geglu_fwd_kernel.default
        assert table["geglu_bwd"] is K.geglu_bwd_kernel.default
        h = K.geglu_fwd(g, u)
        dg, du = K.geglu_bwd(dh, g, u)
    torch.testing.assert_close(h, K.geglu_fwd_kernel(g, u), atol=0, rtol=0)
    torch.testing.assert_close(dg, K.geglu_bwd_kernel(dh, g, u)[0], atol=0, rtol=0)
    torch.testing.assert_close(du, K.geglu_bwd_kernel(dh, g, u)[1], atol=0, rtol=0)


def _weights(f, k, dtype, strided, bias):
    def w(rows, cols):
        t = (torch.randn(rows, cols) * cols**-0.5).to(dtype)
        return t.t().contiguous().t() if strided else t  # same values through a column-major view

    b = (lambda: torch.randn(f).to(dtype)) if bias else (lambda: None)
    return w(f, k), b(), w(f, k), b(), w(k, f)


FUSED = [(1, 72, 37, False, False), (7, 200, 101, True, True), (33, 72, 64, True, False)]


@pytest.mark.parametrize("n, d, f, strided, bias", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_swiglu(n, d, f, strided, bias, dtype):
    x = torch.randn(n, d).to(dtype)
    wg, bg, wu, bu, _ = _weights(f, d, dtype, strided, bias)
    _check(reference.linear_swiglu, K.linear_swiglu_kernel, (x, wg, bg, wu, bu), dtype)
    _check64(reference.linear_swiglu, K.linear_swiglu_kernel, (x, wg, bg, wu, bu))


@pytest.mark.parametrize("n, d, f, strided, bias", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_linear_bwd_and_wgrad(n, d, f, strided, bias, dtype):
    g, u = _gu(n, f, dtype)
    dy = torch.randn(n, d).to(dtype)
    wd = _weights(f, d, dtype, strided, bias)[4]
    _check(reference.swiglu_linear_bwd, K.swiglu_linear_bwd_kernel, (dy, wd, g, u), dtype)
    _check(reference.swiglu_linear_wgrad, K.swiglu_linear_wgrad_kernel, (dy, g, u), dtype)
    _check64(reference.swiglu_linear_bwd, K.swiglu_linear_bwd_kernel, (dy, wd, g, u))
    _check64(reference.swiglu_linear_wgrad, K.swiglu_linear_wgrad_kernel, (dy, g, u))


@pytest.mark.parametrize("n, d, f, strided, bias", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_ffn_recompute(n, d, f, strided, bias, dtype):
    x1, nw = _rms_inputs(n, d, dtype)
    _, rstd = reference.rms_norm_fwd(x1, nw, 1e-6)
    wg, bg, wu, bu, wd = _weights(f, d, dtype, strided, bias)
    dy = torch.randn(n, d).to(dtype)
    args = (x1, rstd, nw, wg, bg, wu, bu, dy, wd)
    _check(reference.swiglu_ffn_recompute, K.swiglu_ffn_recompute_kernel, args, dtype)
    _check64(reference.swiglu_ffn_recompute, K.swiglu_ffn_recompute_kernel, args)


def test_swiglu_ffn_recompute_autocast_dtypes():
    """fp32 weights (norm and linears) with bf16 activations and gradient: n is rounded to fp32 then bf16."""
    x1 = torch.randn(7, 72).bfloat16()
    nw = 1 + 0.5 * torch.randn(72)
    _, rstd = reference.rms_norm_fwd(x1, nw, 1e-6)
    wg, bg, wu, bu, wd = _weights(37, 72, torch.float32, True, True)
    dy = torch.randn(7, 72).bfloat16()
    args = (x1, rstd, nw, wg, bg, wu, bu, dy, wd)
    _check(reference.swiglu_ffn_recompute, K.swiglu_ffn_recompute_kernel, args, torch.bfloat16)


def test_fused_swiglu_errors_name_the_argument():
    x = torch.randn(3, 8)
    w = torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="w_up"):
        K.linear_swiglu_kernel(x, w, None, torch.randn(5, 9), None)
    with pytest.raises(RuntimeError, match="b_gate"):
        K.linear_swiglu_kernel(x, w, torch.randn(4), w, None)
    with pytest.raises(RuntimeError, match="w_down"):
        K.swiglu_linear_bwd_kernel(x, torch.randn(8, 4), torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="g and u"):
        K.swiglu_fwd_kernel(torch.randn(3, 5), torch.randn(3, 6))


# ------------------------------------------------------------------------------------------------------------- RoPE
def _cos_sin(b, t, dh, dtype, batched):
    pos = torch.arange(t, dtype=torch.float64)[None, :] + (torch.arange(b)[:, None] * 3 if batched else 0)
    inv = 10000.0 ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = pos[..., None] * inv
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("b, t, hq, hk, dh", [(1, 1, 4, 4, 8), (3, 7, 4, 2, 64), (1, 33, 6, 1, 18)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_rope(b, t, hq, hk, dh, dtype, inverse, batched):
    q = torch.randn(b, t, hq, dh).to(dtype)
    k = torch.randn(b, t, hk, dh).to(dtype)
    cos, sin = _cos_sin(b, t, dh, dtype, batched)
    _check(reference.rope, K.rope_kernel, (q, k, cos, sin, inverse), dtype)
    _check64(reference.rope, K.rope_kernel, (q, k, cos, sin, inverse))


def test_rope_views_of_a_packed_projection_and_mixed_dtypes():
    b, t, hq, hk, dh = 3, 7, 4, 2, 16
    qkv = torch.randn(b, t, (hq + 2 * hk) * dh).bfloat16()
    q = qkv[..., : hq * dh].view(b, t, hq, dh)  # strided views, unit last stride
    k = qkv[..., hq * dh : (hq + hk) * dh].view(b, t, hk, dh)
    cos, sin = _cos_sin(b, t, dh, torch.float32, True)
    _check(reference.rope, K.rope_kernel, (q, k, cos, sin, False), torch.bfloat16)
    qo, ko = K.rope_kernel(q, k.float(), cos, sin, True)  # k in another dtype than q: its own pass
    rq, rk = reference.rope(q.double(), k.double(), cos.double(), sin.double(), True)
    assert qo.dtype == torch.bfloat16 and ko.dtype == torch.float32
    torch.testing.assert_close(ko.double(), rk, atol=1e-5, rtol=0)


def test_rope_inverse_is_the_adjoint():
    """<rope(x), y> == <x, rope_inverse(y)> in float64."""
    q, k = torch.randn(2, 5, 3, 12, dtype=torch.float64), torch.randn(2, 5, 1, 12, dtype=torch.float64)
    yq, yk = torch.randn_like(q), torch.randn_like(k)
    cos, sin = _cos_sin(2, 5, 12, torch.float64, True)
    fq, fk = K.rope_kernel(q, k, cos, sin, False)
    aq, ak = K.rope_kernel(yq, yk, cos, sin, True)
    torch.testing.assert_close((fq * yq).sum() + (fk * yk).sum(), (q * aq).sum() + (k * ak).sum(), rtol=1e-12, atol=0)


def test_rope_errors_name_the_argument():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    cos, sin = _cos_sin(1, 4, 8, torch.float32, False)
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        K.rope_kernel(torch.randn(1, 4, 2, 7), torch.randn(1, 4, 1, 7), cos[..., :7], sin[..., :7], False)
    with pytest.raises(RuntimeError, match="cos"):
        K.rope_kernel(q, k, cos[:, :3], sin, False)
    with pytest.raises(RuntimeError, match="k must be"):
        K.rope_kernel(q, torch.randn(1, 5, 1, 8), cos, sin, False)


# -------------------------------------------------------------------------------------------- routing and opcheck
def _samples():
    x, w = _rms_inputs(6, 40, torch.float32)
    _, rstd = reference.rms_norm_fwd(x, w, 1e-6)
    xb, wb = _rms_inputs(9, 24, torch.bfloat16, torch.float32)
    _, rstdb = reference.rms_norm_fwd(xb, wb, 1e-6)
    g, u = _gu(6, 21, torch.float32)
    wg, bg, wu, bu, wd = _weights(21, 40, torch.float32, True, True)
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    cos, sin = _cos_sin(2, 5, 8, torch.float32, True)
    return {
        "rms_norm_fwd": [(x, w, 1e-6), (xb, wb, 1e-5)],
        "rms_norm_bwd": [(x, x, rstd, w, x, True), (xb.float(), xb, rstdb, wb, None, False)],
        "swiglu_fwd": [(g, u), (g.bfloat16(), u.bfloat16())],
        "swiglu_bwd": [(u, g, u), (u.bfloat16(), g.bfloat16(), u.bfloat16())],
        "linear_swiglu": [(x, wg, bg, wu, bu), (x.bfloat16(), wg.bfloat16(), None, wu.bfloat16(), None)],
        "swiglu_linear_bwd": [(x, wd, g, u)],
        "swiglu_linear_wgrad": [(x, g, u)],
        "swiglu_ffn_recompute": [(x, rstd, w, wg, bg, wu, bu, x, wd)],
        "rope": [(q, k, cos, sin, False), (q.bfloat16(), k.bfloat16(), cos[:1], sin[:1], True)],
        "geglu_fwd": [(g, u), (g.bfloat16(), u.bfloat16()), (g.bfloat16(), u)],
        "geglu_bwd": [(u, g, u), (u.bfloat16(), g.bfloat16(), u.bfloat16()), (u, g.bfloat16(), u)],
    }


def test_every_llama_op_routes_to_its_kernel():
    for name in LLAMA_OPS:
        kernel = getattr(K, f"{name}_kernel").default
        impl = cpp_bridge.IMPLS[name]
        assert kernel in cpp_bridge.KERNEL_OPS and getattr(impl, "__wrapped__", impl) is kernel


@pytest.mark.parametrize("name", LLAMA_OPS)
def test_opcheck_kernel_op(name):
    for args in _samples()[name]:
        torch.library.opcheck(getattr(K, f"{name}_kernel").default, args)


@pytest.mark.parametrize("name", LLAMA_OPS)
def test_outputs_are_fresh(name):
    for args in _samples()[name]:
        outs = getattr(K, f"{name}_kernel")(*args)
        outs = (outs,) if isinstance(outs, torch.Tensor) else outs
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        for o in outs:
            assert all(o.untyped_storage().data_ptr() != a.untyped_storage().data_ptr() for a in inputs)


def test_graph_ops_on_cpp_backend_match_reference():
    x, w = _rms_inputs(7, 72, torch.float32)
    with ckpt_ext.set_backend("cpp"):
        y, rstd = K.rms_norm_fwd(x, w, 1e-6)
    ry, rrstd = reference.rms_norm_fwd(x, w, 1e-6)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(rstd, rrstd)
