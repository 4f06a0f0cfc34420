"""Every Triton kernel against the reference math (float64 truth, torch's same-dtype error as the yardstick) at tiny,
awkward shapes, under TRITON_INTERPRET=1 (set by conftest). CUDA variants run the same checks on a GPU."""

from __future__ import annotations

import pytest
import torch

from ckpt_ext import reference

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

BASE_ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def to64(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.double()
    return v


def assert_matches_reference(ours, ref_fn, *args, factor: float = 4.0):
    """ours: the kernel's output(s); ref_fn(*args) in the inputs' dtypes and in float64 gives the two references."""
    low = ref_fn(*args)
    high = ref_fn(*(to64(a) for a in args))
    ours, low, high = (x if isinstance(x, (tuple, list)) else (x,) for x in (ours, low, high))
    for o, lo, hi in zip(ours, low, high):
        assert o.dtype == lo.dtype and o.shape == lo.shape, (o.dtype, lo.dtype, o.shape, lo.shape)
        if o.numel() == 0:
            continue
        torch_err = (lo.double() - hi).abs().max().item()
        scale = 1.0 + hi.abs().max().item()
        atol = factor * torch_err + BASE_ATOL.get(lo.dtype, 1e-5) * scale
        torch.testing.assert_close(o.double(), hi, atol=atol, rtol=0.0)


APPROX = ("none", "tanh")


@pytest.fixture(scope="module")
def L():
    from ckpt_ext.backends.triton import launchers

    return launchers


def _devices():
    cuda = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                           reason="needs a CUDA device")])  # fmt: skip
    return ("cpu", cuda)


def _ln_inputs(n, d, dtype, device):
    x = torch.randn(n, d, dtype=dtype, device=device) * 2 + 0.5
    w = torch.randn(d, dtype=dtype, device=device)
    b = torch.randn(d, dtype=dtype, device=device)
    _, mean, rstd = reference.layer_norm_fwd(x, w, b, 1e-5)
    return x, w, b, mean, rstd


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 72), (7, 200), (33, 72)])
def test_layer_norm_fwd(L, device, dtype, n, d):
    x, w, b, _, _ = _ln_inputs(n, d, dtype, device)
    y, mean, rstd = L.layer_norm_fwd(x, w, b, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32
    assert_matches_reference((y, mean, rstd), reference.layer_norm_fwd, x, w, b, 1e-5)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 72), (7, 200), (33, 72)])
@pytest.mark.parametrize("with_residual,emit_y", [(True, True), (False, False)])
def test_layer_norm_bwd(L, device, dtype, n, d, with_residual, emit_y):
    x, w, b, mean, rstd = _ln_inputs(n, d, dtype, device)
    dy = torch.randn(n, d, dtype=dtype, device=device)
    dres = torch.randn(n, d, dtype=dtype, device=device) if with_residual else None
    out = L.layer_norm_bwd(dy, x, mean, rstd, w, b, dres, emit_y)
    assert_matches_reference(out, reference.layer_norm_bwd, dy, x, mean, rstd, w, b, dres, emit_y)


def test_layer_norm_strided_rows(L):
    x = torch.randn(9, 150)[:, :72]
    w, b = torch.randn(72), torch.randn(72)
    assert_matches_reference(L.layer_norm_fwd(x, w, b, 1e-5), reference.layer_norm_fwd, x, w, b, 1e-5)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(L, device, dtype, approximate, with_bias):
    x = torch.randn(2, 7, 200, dtype=dtype, device=device) * 3
    bias = torch.randn(200, dtype=dtype, device=device) if with_bias else None
    assert_matches_reference(L.bias_gelu(x, bias, approximate), reference.bias_gelu, x, bias, approximate)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_bwd(L, device, dtype, approximate):
    u = torch.randn(33, 72, dtype=dtype, device=device) * 3
    da = torch.randn(33, 72, dtype=dtype, device=device)
    assert_matches_reference(L.gelu_bwd(da, u, approximate), reference.gelu_bwd, da, u, approximate)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("residual_dtype", [None, torch.float32])
def test_dropout_add_bit_exact_mask(L, device, dtype, p, residual_dtype):
    x = torch.randn(33, 72, dtype=dtype, device=device)
    res = None if residual_dtype is None else torch.randn(33, 72, dtype=residual_dtype, device=device)
    seed = 2**31 - 17
    out = L.dropout_add(x, res, p, seed)
    ref = reference.dropout_add(x, res, p, seed)
    assert out.dtype == ref.dtype
    dropped = ~reference.dropout_keep_mask(x.numel(), p, seed, x.device).view(x.shape)
    base = torch.zeros_like(out) if res is None else res.to(out.dtype)
    assert torch.equal(out[dropped], base[dropped])
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=0.0, rtol=0.0)
    assert_matches_reference(out, reference.dropout_add, x, res, p, seed)
    assert out.data_ptr() not in (x.data_ptr(), None if res is None else res.data_ptr())


def _weight(shape, dtype, device, transposed):
    """A (rows, cols) weight, either contiguous or a transposed view of a (cols, rows) tensor."""
    if transposed:
        return (torch.randn(shape[1], shape[0], device=device) * 0.1).to(dtype).t()
    return (torch.randn(*shape, device=device) * 0.1).to(dtype)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("n,d,h,transposed", [(1, 72, 200, False), (33, 72, 200, True), (7, 200, 72, True)])
def test_ffn_recompute(L, device, dtype, approximate, n, d, h, transposed):
    x1, lw, lb, mean, rstd = _ln_inputs(n, d, dtype, device)
    w1 = _weight((h, d), dtype, device, transposed)
    b1 = torch.randn(h, dtype=dtype, device=device)
    dy = torch.randn(n, d, dtype=dtype, device=device)
    w2 = _weight((d, h), dtype, device, transposed)
    a, du, db1 = out = L.ffn_recompute(x1, mean, rstd, lw, lb, w1, b1, dy, w2, approximate)
    assert db1.dtype == torch.float32 and a.dtype == du.dtype == dtype
    assert_matches_reference(out, reference.ffn_recompute, x1, mean, rstd, lw, lb, w1, b1, dy, w2, approximate)


def test_ffn_recompute_mixed_dtypes(L):
    """Under autocast the LN input stays fp32 while the weights and dY are 16-bit."""
    x1, lw, lb, mean, rstd = _ln_inputs(7, 72, torch.float32, "cpu")
    w1 = _weight((200, 72), torch.bfloat16, "cpu", True)
    b1 = torch.randn(200, dtype=torch.bfloat16)
    dy = torch.randn(7, 72, dtype=torch.bfloat16)
    w2 = _weight((72, 200), torch.bfloat16, "cpu", False)
    out = L.ffn_recompute(x1, mean, rstd, lw, lb, w1, b1, dy, w2, "tanh")
    assert_matches_reference(out, reference.ffn_recompute, x1, mean, rstd, lw, lb, w1, b1, dy, w2, "tanh")


def test_ffn_recompute_db1_is_deterministic(L):
    """db1 comes from per-row-block partial sums (no atomics): two runs agree bit for bit."""
    x1, lw, lb, mean, rstd = _ln_inputs(40, 72, torch.float32, "cpu")
    w1, w2 = _weight((100, 72), torch.float32, "cpu", False), _weight((72, 100), torch.float32, "cpu", True)
    b1, dy = torch.randn(100), torch.randn(40, 72)
    first = L.ffn_recompute(x1, mean, rstd, lw, lb, w1, b1, dy, w2, "none")
    second = L.ffn_recompute(x1, mean, rstd, lw, lb, w1, b1, dy, w2, "none")
    for f, s in zip(first, second):
        assert torch.equal(f, s)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("n,k,h,transposed,with_bias", [(1, 72, 200, False, True), (33, 72, 200, True, True),
                                                         (7, 200, 72, True, False)])  # fmt: skip
def test_linear_bias_gelu(L, device, dtype, approximate, n, k, h, transposed, with_bias):
    x = torch.randn(n, k, dtype=dtype, device=device)
    w = _weight((h, k), dtype, device, transposed) * 5
    b = torch.randn(h, dtype=dtype, device=device) if with_bias else None
    out = L.linear_bias_gelu(x, w, b, approximate)
    assert_matches_reference(out, reference.linear_bias_gelu, x, w, b, approximate)


def test_linear_bias_gelu_strided_input(L):
    x = torch.randn(72, 9).t()
    w, b = _weight((200, 72), torch.float32, "cpu", True), torch.randn(200)
    assert_matches_reference(L.linear_bias_gelu(x, w, b, "tanh"), reference.linear_bias_gelu, x, w, b, "tanh")


def _assert_same_mask(out, x, w, b, res, p, seed):
    """Dropped elements hold exactly the residual; kept elements whose projection is not tiny moved off it."""
    n, d = out.shape
    keep = reference.dropout_keep_mask(n * d, p, seed, out.device).view(n, d)
    base = res.to(out.dtype)
    assert torch.equal(out[~keep], base[~keep])
    y = x.double() @ w.double().t() + (0.0 if b is None else b.double())
    assert (out != base)[keep & (y.abs() > 0.05)].all()


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d,p,with_bias,transposed", [(1, 72, 50, 0.3, True, False), (7, 200, 72, 0.0, False, True),
                                                           (33, 72, 200, 0.3, False, True)])  # fmt: skip
def test_linear_dropout_add(L, device, dtype, n, k, d, p, with_bias, transposed):
    x = torch.randn(n, k, dtype=dtype, device=device)
    w = _weight((d, k), dtype, device, transposed)
    b = torch.randn(d, dtype=dtype, device=device) if with_bias else None
    res = torch.randn(n, d, dtype=dtype, device=device)
    seed = 2**31 - 17
    out = L.linear_dropout_add(x, w, b, res, p, seed)
    assert out.dtype == dtype and out.shape == (n, d) and out.data_ptr() != res.data_ptr()
    _assert_same_mask(out, x, w, b, res, p, seed)
    assert_matches_reference(out, reference.linear_dropout_add, x, w, b, res, p, seed)


@pytest.mark.parametrize("x_dtype,res_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_linear_dropout_add_mixed_dtypes(L, x_dtype, res_dtype):
    """Under autocast the projection runs in bf16 while the residual stream stays fp32 (out in residual.dtype)."""
    x = torch.randn(33, 72, dtype=x_dtype)
    w, b = _weight((50, 72), x_dtype, "cpu", True), torch.randn(50, dtype=x_dtype)
    res = torch.randn(33, 50, dtype=res_dtype)
    out = L.linear_dropout_add(x, w, b, res, 0.3, 5)
    assert out.dtype == res_dtype
    _assert_same_mask(out, x, w, b, res, 0.3, 5)
    assert_matches_reference(out, reference.linear_dropout_add, x, w, b, res, 0.3, 5)


def test_linear_dropout_add_strided_inputs_and_fallbacks(L):
    x, res = torch.randn(200, 7).t(), torch.randn(7, 150)[:, :50]
    w, b = _weight((50, 200), torch.float32, "cpu", True), torch.randn(50)
    out = L.linear_dropout_add(x, w, b, res, 0.3, 2**40 + 3)
    ref = reference.linear_dropout_add(x, w, b, res, 0.3, 2**40 + 3)
    _assert_same_mask(out, x, w, b, res, 0.3, 2**40 + 3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for args in ((x.double(), w.double(), b.double(), res.double()), (x[:0], w, b, res[:0])):
        torch.testing.assert_close(L.linear_dropout_add(*args, 0.3, 1), reference.linear_dropout_add(*args, 0.3, 1))


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("n,d,h,transposed", [(1, 72, 200, True), (33, 200, 72, False)])
def test_linear_gelu_bwd(L, device, dtype, approximate, n, d, h, transposed):
    dy = torch.randn(n, d, dtype=dtype, device=device)
    w2 = _weight((d, h), dtype, device, transposed)
    u = torch.randn(n, h, dtype=dtype, device=device) * 2
    out = L.linear_gelu_bwd(dy, w2, u, approximate)
    assert_matches_reference(out, reference.linear_gelu_bwd, dy, w2, u, approximate)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("n,d,h,strided_dy", [(1, 72, 200, False), (33, 72, 200, True), (7, 200, 72, False)])
def test_gelu_linear_wgrad(L, device, dtype, approximate, n, d, h, strided_dy):
    dy = _weight((n, d), dtype, device, strided_dy) * 10
    u = torch.randn(n, h, dtype=dtype, device=device) * 2
    out = L.gelu_linear_wgrad(dy, u, approximate)
    assert_matches_reference(out, reference.gelu_linear_wgrad, dy, u, approximate)


def test_float64_falls_back_to_reference(L):
    x = torch.randn(7, 72, dtype=torch.float64)
    w, b = torch.randn(72, dtype=torch.float64), torch.randn(72, dtype=torch.float64)
    for o, r in zip(L.layer_norm_fwd(x, w, b, 1e-5), reference.layer_norm_fwd(x, w, b, 1e-5)):
        torch.testing.assert_close(o, r)


def test_graph_ops_route_to_triton():
    import ckpt_ext
    from ckpt_ext import backend

    wanted = {"ffn_recompute", "linear_bias_gelu", "linear_dropout_add", "layer_norm_bwd", "dropout_add"}
    assert wanted <= backend.implements("triton")
    x = torch.randn(7, 72)
    w, b = torch.randn(72), torch.randn(72)
    with ckpt_ext.set_backend("triton"):
        y, mean, rstd = torch.ops.ckpt_ext.layer_norm_fwd(x, w, b, 1e-5)
    assert_matches_reference((y, mean, rstd), reference.layer_norm_fwd, x, w, b, 1e-5)


def test_autotune_configs_follow_the_device(monkeypatch):
    from ckpt_ext.kernels import matmul_configs as mc

    every = list(mc.SM90 + mc.SM80)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, wanted in (((9, 0), mc.SM90), ((8, 0), mc.SM80), ((8, 9), mc.SM80), ((10, 0), mc.SM90)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert [mc._key(c) for c in mc.prune_for_device(every, {})] == [mc._key(c) for c in wanted]
    assert len(mc.configs()) == 1  # the interpreter runs a single config
