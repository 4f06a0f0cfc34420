"""The Llama-family Triton kernels (RMSNorm, SwiGLU, RoPE, the fused SwiGLU GEMMs; GeGLU, the gated MLP of Gemma /
ModernBERT) against the reference math.

Each launcher runs under TRITON_INTERPRET=1 (conftest) at tiny awkward shapes (rows 1/7/33, width 72/200, batch 1 and
3) and is compared with ckpt_ext.reference in float64 (truth), within a few times the error of the same reference run
in the inputs' own dtype (PyTorch's same-dtype error) plus a small floor. Inputs: fp32, bf16 (loaded and upcast by the
kernels) and the mixed dtypes Hugging Face produces (fp32 norm weight with bf16 activations). The reference module is
hidden from the launchers while they run, so a silent fallback to the reference math fails the test."""

from __future__ import annotations

import pytest
import torch

from ckpt_ext import reference

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

BF16, F32 = torch.bfloat16, torch.float32
BASE_ATOL = {F32: 1e-5, torch.float16: 2e-3, BF16: 1.6e-2}


def _to64(v):
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _check(ours, ref_fn, *args, factor: float = 4.0):
    """ours vs ref_fn(*args) in float64, atol = factor · |ref in the inputs' dtypes - float64| + floor · scale."""
    low, high = ref_fn(*args), ref_fn(*(_to64(a) for a in args))
    ours, low, high = (x if isinstance(x, (tuple, list)) else (x,) for x in (ours, low, high))
    assert len(ours) == len(low)
    for o, lo, hi in zip(ours, low, high):
        assert o.dtype == lo.dtype and o.shape == lo.shape, (o.dtype, lo.dtype, o.shape, lo.shape)
        assert o.is_contiguous()
        if o.numel() == 0:
            continue
        torch_err = (lo.double() - hi).abs().max().item()
        atol = factor * torch_err + BASE_ATOL[lo.dtype] * (1.0 + hi.abs().max().item())
        torch.testing.assert_close(o.double(), hi, atol=atol, rtol=0.0)


@pytest.fixture()
def K(monkeypatch):
    """The triton launchers, with the reference math hidden from them (no silent fallback)."""
    from ckpt_ext.backends.triton import llama_launchers

    monkeypatch.setattr(llama_launchers, "reference", None)
    return llama_launchers.IMPLS


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a view with a padded row stride (unit last stride)."""
    wide = torch.zeros(t.shape[0], t.shape[1] + 5, dtype=t.dtype)
    wide[:, 2 : 2 + t.shape[1]] = t
    return wide[:, 2 : 2 + t.shape[1]]


# ---------------------------------------------------------------------------------------------------- RMSNorm
NORM_CASES = [(1, 72, F32, F32), (33, 200, F32, F32), (7, 72, BF16, BF16), (33, 200, BF16, F32)]


def _norm_inputs(n, d, xdt, wdt):
    x = (torch.randn(n, d) * 2 + 0.5).to(xdt)
    w = (1 + 0.5 * torch.randn(d)).to(wdt)
    return x, w


@pytest.mark.parametrize("n,d,xdt,wdt", NORM_CASES)
def test_rms_norm_fwd(K, n, d, xdt, wdt):
    x, w = _norm_inputs(n, d, xdt, wdt)
    y, rstd = K["rms_norm_fwd"](_strided(x), w, 1e-6)
    assert rstd.dtype == F32 and y.dtype == torch.promote_types(xdt, wdt)
    _check((y, rstd), reference.rms_norm_fwd, x, w, 1e-6)


@pytest.mark.parametrize("n,d,xdt,wdt", NORM_CASES)
@pytest.mark.parametrize("with_residual,emit_y", [(True, True), (False, False)])
def test_rms_norm_bwd(K, n, d, xdt, wdt, with_residual, emit_y):
    x, w = _norm_inputs(n, d, xdt, wdt)
    _, rstd = reference.rms_norm_fwd(x, w, 1e-6)
    dy = torch.randn(n, d).to(torch.promote_types(xdt, wdt))
    dres = torch.randn(n, d).to(xdt) if with_residual else None
    dx, dw, y = K["rms_norm_bwd"](_strided(dy), _strided(x), rstd, w, dres, emit_y)
    assert dw.dtype == wdt and (y.numel() > 0) == emit_y
    _check((dx, dw, y), reference.rms_norm_bwd, dy, x, rstd, w, dres, emit_y)


@pytest.mark.parametrize("emit", ["fwd", "bwd"])
def test_rms_norm_hf_cast_order(K, emit):
    """bf16 x, fp32 weight: y (fp32) = w · n with n = x̂ rounded to bf16, as LlamaRMSNorm. Skipping that rounding
    moves almost every element by up to 2⁻⁹ relative; a 1-ulp rstd difference may flip the odd rounding (< 1%)."""
    x, w = _norm_inputs(33, 200, BF16, F32)
    want, rstd = reference.rms_norm_fwd(x, w, 1e-6)
    if emit == "fwd":
        y, _ = K["rms_norm_fwd"](x, w, 1e-6)
    else:
        _, _, y = K["rms_norm_bwd"](torch.randn(33, 200), x, rstd, w, None, True)
    off = ((y - want).abs() > 1e-6 * want.abs() + 1e-30).float().mean().item()
    assert y.dtype == F32 and off < 0.01, off


def test_rms_norm_bwd_dweight_sums_every_row(K):
    """dweight over more rows than programs (the partials and their reduction both matter): exact in fp32 up to
    summation order against an fp64 sum."""
    x, w = _norm_inputs(33, 72, F32, F32)
    _, rstd = reference.rms_norm_fwd(x, w, 1e-6)
    dy = torch.randn(33, 72)
    _, dw, _ = K["rms_norm_bwd"](dy, x, rstd, w, None, False)
    expected = (dy.double() * x.double() * rstd.double()[:, None]).sum(0)
    torch.testing.assert_close(dw.double(), expected, atol=1e-5, rtol=1e-6)


def test_rms_norm_per_head(K):
    """Qwen3's q/k norm: x viewed (N·heads, head_dim)."""
    q = torch.randn(3, 7, 4, 16).to(BF16)
    w = (1 + 0.5 * torch.randn(16)).to(BF16)
    y, rstd = K["rms_norm_fwd"](q.view(-1, 16), w, 1e-6)
    assert y.shape == (84, 16) and rstd.shape == (84,)
    _check((y, rstd), reference.rms_norm_fwd, q.view(-1, 16), w, 1e-6)


# ---------------------------------------------------------------------------------------- SwiGLU and GeGLU
@pytest.fixture()
def KG(monkeypatch):
    """The gated-MLP pointwise launchers (SwiGLU, GeGLU), with the reference math hidden from them."""
    from ckpt_ext.backends.triton import gated_launchers

    monkeypatch.setattr(gated_launchers, "reference", None)
    return gated_launchers.IMPLS


@pytest.mark.parametrize("n,f,dt", [(1, 72, F32), (7, 200, F32), (33, 72, BF16)])
def test_swiglu_pointwise(KG, n, f, dt):
    g, u, dh = (torch.randn(n, f).mul(3).to(dt) for _ in range(3))
    _check(KG["swiglu_fwd"](_strided(g), u), reference.swiglu_fwd, g, u)
    _check(KG["swiglu_bwd"](dh, g, _strided(u)), reference.swiglu_bwd, dh, g, u)


@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("f", [72, 200, 1000])
@pytest.mark.parametrize("dt", [F32, BF16])
def test_geglu_pointwise(KG, n, f, dt):
    g, u, dh = (torch.randn(n, f).mul(3).to(dt) for _ in range(3))
    _check(KG["geglu_fwd"](_strided(g), u), reference.geglu_fwd, g, u)
    _check(KG["geglu_bwd"](dh, g, _strided(u)), reference.geglu_bwd, dh, g, u)


def test_geglu_pointwise_mixed_dtypes_and_extremes(KG):
    g, u = torch.randn(7, 72).mul(3).to(BF16), torch.randn(7, 72)  # fp32 u beside a bf16 gate
    g[0, :4] = torch.tensor([-200.0, 200.0, -1e4, 1e4])  # the sigmoid form clamps 2z: finite, no NaN
    dh = torch.randn(7, 72)
    _check(KG["geglu_fwd"](g, u), reference.geglu_fwd, g, u)
    dg, du = KG["geglu_bwd"](dh, g, u)
    _check((dg, du), reference.geglu_bwd, dh, g, u)
    assert dg.isfinite().all() and du.isfinite().all()


def test_gated_triton_backend_routes_to_the_launchers():
    from ckpt_ext.backends import triton as triton_backend
    from ckpt_ext.backends.triton import gated_launchers

    impls = triton_backend.impls()
    for op in ("swiglu_fwd", "swiglu_bwd", "geglu_fwd", "geglu_bwd"):
        assert impls[op] is gated_launchers.IMPLS[op]


def _weights(f, k, dt, transposed=False):
    w = torch.randn(f, k) / k**0.5
    return (w.t().contiguous().t() if transposed else w).to(dt)


@pytest.mark.parametrize("n,k,f,dt,bias", [(1, 72, 40, F32, True), (7, 200, 24, F32, False), (33, 72, 40, BF16, True)])
def test_linear_swiglu(K, n, k, f, dt, bias):
    x = torch.randn(n, k).to(dt)
    wg, wu = _weights(f, k, dt, transposed=True), _weights(f, k, dt)
    bg = torch.randn(f).to(dt) if bias else None
    bu = torch.randn(f).to(dt) if bias else None
    _check(K["linear_swiglu"](_strided(x), wg, bg, wu, bu), reference.linear_swiglu, x, wg, bg, wu, bu)


@pytest.mark.parametrize("n,d,f,dt", [(1, 72, 40, F32), (7, 200, 24, F32), (33, 72, 40, BF16)])
def test_swiglu_linear_bwd_and_wgrad(K, n, d, f, dt):
    dy = torch.randn(n, d).to(dt)
    wd = _weights(d, f, dt, transposed=True)
    g, u = (torch.randn(n, f).mul(2).to(dt) for _ in range(2))
    _check(K["swiglu_linear_bwd"](dy, wd, _strided(g), u), reference.swiglu_linear_bwd, dy, wd, g, u)
    _check(K["swiglu_linear_wgrad"](_strided(dy), g, _strided(u)), reference.swiglu_linear_wgrad, dy, g, u)


@pytest.mark.parametrize(
    "n,d,f,xdt,wdt,bias",
    [(1, 72, 40, F32, F32, False), (7, 200, 24, F32, F32, True), (33, 72, 40, BF16, BF16, True),
     (7, 72, 40, BF16, F32, False)],
)  # fmt: skip
def test_swiglu_ffn_recompute(K, n, d, f, xdt, wdt, bias):
    """The recompute op; the last case is Hugging Face under autocast (bf16 x1 with the fp32 norm weight)."""
    x1, nw = _norm_inputs(n, d, xdt, wdt)
    _, rstd = reference.rms_norm_fwd(x1, nw, 1e-6)
    gdt = BF16 if BF16 in (xdt, wdt) else F32
    wg, wu, wd = _weights(f, d, gdt), _weights(f, d, gdt, transposed=True), _weights(d, f, gdt)
    bg = torch.randn(f).to(gdt) if bias else None
    bu = torch.randn(f).to(gdt) if bias else None
    dy = torch.randn(n, d).to(gdt)
    args = (x1, rstd, nw, wg, bg, wu, bu, dy, wd)
    h, dg, du = K["swiglu_ffn_recompute"](_strided(x1), rstd, nw, wg, bg, wu, bu, _strided(dy), wd)
    _check((h, dg, du), reference.swiglu_ffn_recompute, *args)


def test_swiglu_ffn_recompute_rounds_the_norm_like_hf(K):
    """bf16 x1 with fp32 everything else: the prologue's n must be x̂ rounded to bf16 times the weight, exactly as
    reference.rms_norm_apply (unrounded, h moves by ~2⁻⁹ relative)."""
    n, d, f = 7, 72, 40
    x1, nw = _norm_inputs(n, d, BF16, F32)
    _, rstd = reference.rms_norm_fwd(x1, nw, 1e-6)
    wg, wu, wd = _weights(f, d, F32), _weights(f, d, F32), _weights(d, f, F32)
    dy = torch.randn(n, d)
    ours = K["swiglu_ffn_recompute"](x1, rstd, nw, wg, None, wu, None, dy, wd)
    want = reference.swiglu_ffn_recompute(x1, rstd, nw, wg, None, wu, None, dy, wd)
    for o, w in zip(ours, want):
        torch.testing.assert_close(o, w, atol=1e-5, rtol=1e-5)


def test_swiglu_ffn_recompute_equals_its_parts(K):
    """The fused op is exactly rms_norm_fwd -> linear GEMMs -> swiglu_bwd/fwd composed (fp32, tight)."""
    n, d, f = 7, 72, 40
    x1, nw = _norm_inputs(n, d, F32, F32)
    y, rstd = reference.rms_norm_fwd(x1, nw, 1e-6)
    wg, wu, wd = _weights(f, d, F32), _weights(f, d, F32), _weights(d, f, F32)
    dy = torch.randn(n, d)
    h, dg, du = K["swiglu_ffn_recompute"](x1, rstd, nw, wg, None, wu, None, dy, wd)
    g, u, dh = y.double() @ wg.double().t(), y.double() @ wu.double().t(), dy.double() @ wd.double()
    s = torch.sigmoid(g)
    for ours, want in ((h, g * s * u), (dg, dh * u * s * (1 + g * (1 - s))), (du, dh * g * s)):
        torch.testing.assert_close(ours.double(), want, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------- RoPE
def _rope_inputs(b, t, hq, hk, dh, dt, cos_batch):
    qkv = torch.randn(b, t, hq + 2 * hk, dh).to(dt)  # packed projection: q and k are strided views
    q, k = qkv[:, :, :hq], qkv[:, :, hq : hq + hk]
    pos = torch.arange(t, dtype=torch.float64)[None, :].expand(cos_batch, t) + torch.arange(cos_batch)[:, None] * 3
    freqs = pos[..., None] / (10000.0 ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    emb = torch.cat((freqs, freqs), dim=-1)
    return q, k, emb.cos().float(), emb.sin().float()


@pytest.mark.parametrize(
    "b,t,hq,hk,dh,dt,cos_batch",
    [(1, 1, 4, 2, 8, F32, 1), (3, 7, 4, 2, 16, F32, 3), (3, 7, 3, 3, 12, BF16, 1), (1, 33, 6, 1, 8, BF16, 1)],
)
@pytest.mark.parametrize("inverse", [False, True])
def test_rope(K, b, t, hq, hk, dh, dt, cos_batch, inverse):
    q, k, cos, sin = _rope_inputs(b, t, hq, hk, dh, dt, cos_batch)
    assert q.stride(1) == (hq + 2 * hk) * dh  # read through the packed projection's strides
    _check(K["rope"](q, k, cos, sin, inverse), reference.rope, q, k, cos, sin, inverse)


def test_rope_inverse_is_the_adjoint(K):
    """<rope(x), y> = <x, rope_inverse(y)> for q and k (the backward of RoPE is its inverse=True call)."""
    q, k, cos, sin = _rope_inputs(3, 7, 4, 2, 16, F32, 3)
    yq, yk = torch.randn_like(q), torch.randn_like(k)
    fq, fk = K["rope"](q, k, cos, sin, False)
    bq, bk = K["rope"](yq, yk, cos, sin, True)
    torch.testing.assert_close((fq * yq).sum(), (q * bq).sum(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close((fk * yk).sum(), (k * bk).sum(), atol=1e-4, rtol=1e-5)
