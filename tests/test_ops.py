"""Every ckpt_ext::* graph op: opcheck (schema, fake kernel, autograd registration, aot dispatch), gradcheck of the
differentiable ops in float64, and the hand-written backward ops against autograd of the reference forward math."""

import pytest
import torch

import ckpt_ext
from ckpt_ext import ops, reference, reference_attention

APPROX = ["none", "tanh"]


def _ln_inputs(n, d, dtype=torch.float32, requires_grad=False):
    x = torch.randn(n, d, dtype=dtype) * 2 + 0.5
    w = torch.randn(d, dtype=dtype)
    b = torch.randn(d, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (x, w, b)]


def sample_calls(requires_grad=False):
    """(op, args) pairs covering every graph op, with awkward sizes."""
    n, d, h, heads, bsz, t = 7, 12, 20, 3, 1, 7
    x, w, b = _ln_inputs(n, d, requires_grad=requires_grad)
    _, mean, rstd = reference.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    u = torch.randn(n, h, requires_grad=requires_grad)
    qkv = torch.randn(bsz, t, 3 * d, requires_grad=requires_grad)
    out, lse = reference_attention.attention_fwd(qkv.detach(), heads, True, 0.0, 0, None)
    w1, b1, w2 = torch.randn(h, d), torch.randn(h), torch.randn(d, h)
    calls = [
        (ops.layer_norm_fwd, (x, w, b, 1e-5)),
        (ops.layer_norm_bwd, (torch.randn(n, d), x.detach(), mean, rstd, w.detach(), b.detach(), None, False)),
        (
            ops.layer_norm_bwd,
            (torch.randn(n, d), x.detach(), mean, rstd, w.detach(), b.detach(), torch.randn(n, d), True),
        ),  # fmt: skip
        (ops.dropout_add, (u, None, 0.3, 17)),
        (ops.dropout_add, (u, torch.randn(n, h, requires_grad=requires_grad), 0.0, 0)),
        (ops.ffn_recompute, (x.detach(), mean, rstd, w.detach(), b.detach(), w1, b1, torch.randn(n, d), w2, "tanh")),
        (
            ops.ffn_recompute,
            (
                x.detach(),
                mean,
                rstd,
                w.detach(),
                b.detach(),
                w1.t().contiguous().t(),
                b1,
                torch.randn(n, d),
                w2.t().contiguous().t(),
                "none",
            ),
        ),  # fmt: skip
        (ops.linear_bias_gelu, (x.detach(), w1, b1, "tanh")),
        (ops.linear_dropout_add, (u, w2, torch.randn(d, requires_grad=requires_grad), x, 0.3, 11)),
        (ops.linear_dropout_add, (u, w2.t().contiguous().t(), None, x, 0.0, 0)),
        (ops.linear_bias_gelu, (x.detach(), w1.t().contiguous().t(), None, "none")),
        (ops.linear_gelu_bwd, (torch.randn(n, d), w2, u.detach(), "none")),
        (ops.gelu_linear_wgrad, (torch.randn(n, d), u.detach(), "tanh")),
        (ops.attention_fwd, (qkv, heads, True, 0.0, 0, None)),
        (ops.attention_fwd, (qkv, heads, False, 0.25, 5, torch.zeros(bsz, 1, 1, t))),
        (ops.attention_bwd, (torch.randn(bsz, t, d), qkv.detach(), out, lse, heads, True, 0.0, 0, None)),
    ]
    calls += llama_sample_calls(requires_grad)
    for approx in APPROX:
        calls.append((ops.bias_gelu, (u, torch.randn(h, requires_grad=requires_grad), approx)))
        calls.append((ops.bias_gelu, (u, None, approx)))
        calls.append((ops.gelu_bwd, (torch.randn(n, h), u.detach(), approx)))
    return calls


def llama_sample_calls(requires_grad=False):
    """(op, args) for the Llama-family ops and GQA attention: odd widths, strided weights, bf16 beside fp32."""
    n, d, f, bsz, t, heads, kv, dh = 7, 12, 10, 1, 7, 4, 2, 6
    rg = dict(requires_grad=requires_grad)
    x, w = torch.randn(n, d, **rg), torch.randn(d, **rg)
    _, rstd = reference.rms_norm_fwd(x.detach(), w.detach(), 1e-6)
    g, u = torch.randn(n, f, **rg), torch.randn(n, f, **rg)
    wg, wu, wd = torch.randn(f, d), torch.randn(f, d).t().contiguous().t(), torch.randn(d, f)
    q, k, v = torch.randn(bsz, t, heads, dh, **rg), torch.randn(bsz, t, kv, dh, **rg), torch.randn(bsz, t, kv, dh, **rg)
    ang = torch.randn(1, t, dh // 2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    out, lse = reference_attention.gqa_attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.0, 0, None, dh**-0.5)
    mask = torch.rand(bsz, 1, t, t) > 0.3
    return [
        (ops.rms_norm_fwd, (x, w, 1e-6)),
        (ops.rms_norm_fwd, (x.detach().bfloat16(), w.detach(), 1e-5)),
        (ops.rms_norm_bwd, (torch.randn(n, d), x.detach(), rstd, w.detach(), None, False)),
        (ops.rms_norm_bwd, (torch.randn(n, d), x.detach(), rstd, w.detach(), torch.randn(n, d), True)),
        (ops.swiglu_fwd, (g, u)),
        (ops.swiglu_bwd, (torch.randn(n, f), g.detach(), u.detach())),
        (ops.geglu_fwd, (g, u)),
        (ops.geglu_bwd, (torch.randn(n, f), g.detach(), u.detach())),
        (ops.linear_swiglu, (x.detach(), wg, torch.randn(f), wu, None)),
        (ops.swiglu_linear_bwd, (torch.randn(n, d), wd, g.detach(), u.detach())),
        (ops.swiglu_linear_wgrad, (torch.randn(n, d), g.detach(), u.detach())),
        (ops.swiglu_ffn_recompute, (x.detach(), rstd, w.detach(), wg, None, wu, torch.randn(f), torch.randn(n, d), wd)),
        (ops.rope, (q, k, cos, sin, False)),
        (ops.rope, (q, k, cos.expand(bsz, t, dh).contiguous(), sin, True)),
        (ops.gqa_attention_fwd, (q, k, v, True, 0.0, 0, None, dh**-0.5)),
        (ops.gqa_attention_fwd, (q, k, v, False, 0.25, 5, mask, 0.3)),
        (
            ops.gqa_attention_bwd,
            (
                torch.randn(bsz, t, heads, dh),
                q.detach(),
                k.detach(),
                v.detach(),
                out,
                lse,
                True,
                0.0,
                0,
                None,
                dh**-0.5,
            ),
        ),  # fmt: skip
    ]


def test_llama_ops_gradcheck_float64():
    """The differentiable Llama-family ops against float64 finite differences (reference backend)."""
    d64 = dict(dtype=torch.float64, requires_grad=True)
    x, w = torch.randn(5, 6, **d64), torch.randn(6, **d64)
    g, u = torch.randn(4, 7, **d64), torch.randn(4, 7, **d64)
    q, k = torch.randn(2, 3, 4, 6, **d64), torch.randn(2, 3, 2, 6, **d64)
    cos, sin = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(1, 3, 6, dtype=torch.float64)
    with ckpt_ext.set_backend("reference"):
        assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm_fwd(x, w, 1e-6)[0], (x, w))
        assert torch.autograd.gradcheck(ops.swiglu_fwd, (g, u))
        assert torch.autograd.gradcheck(ops.geglu_fwd, (g, u))
        for inverse in (False, True):
            assert torch.autograd.gradcheck(lambda q, k, i=inverse: ops.rope(q, k, cos, sin, i), (q, k))


def test_llama_backward_ops_match_autograd_of_reference():
    """rms_norm_bwd, swiglu_bwd, the fused SwiGLU backward ops and rope's adjoint equal autograd of plain math."""
    torch.manual_seed(3)
    n, d, f = 9, 10, 7
    x, w = torch.randn(n, d, dtype=torch.float64, requires_grad=True), torch.randn(d, dtype=torch.float64)
    w.requires_grad_(True)
    dy, dres = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    y = w * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6))
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    rstd = torch.rsqrt(x.detach().square().mean(-1) + 1e-6)
    dx, dw, y2 = reference.rms_norm_bwd(dy, x.detach(), rstd, w.detach(), dres, True)
    torch.testing.assert_close(dx, gx + dres)
    torch.testing.assert_close(dw, gw)
    torch.testing.assert_close(y2, y.detach())
    g, u = torch.randn(n, f, dtype=torch.float64, requires_grad=True), torch.randn(n, f, dtype=torch.float64)
    u.requires_grad_(True)
    wd, wgt, wup = (torch.randn(*s, dtype=torch.float64) for s in ((d, f), (f, d), (f, d)))
    h = torch.nn.functional.silu(g) * u
    dh = dy @ wd
    dg_ref, du_ref = torch.autograd.grad(h, (g, u), dh)
    for dg, du in (reference.swiglu_bwd(dh, g.detach(), u.detach()),
                   reference.swiglu_linear_bwd(dy, wd, g.detach(), u.detach())):  # fmt: skip
        torch.testing.assert_close(dg, dg_ref)
        torch.testing.assert_close(du, du_ref)
    torch.testing.assert_close(reference.swiglu_linear_wgrad(dy, g.detach(), u.detach()), dy.t() @ h.detach())
    n2 = (w * x * rstd[:, None]).detach()
    gate, up = n2 @ wgt.t(), n2 @ wup.t()
    hh, dg, du = reference.swiglu_ffn_recompute(x.detach(), rstd, w.detach(), wgt, None, wup, None, dy, wd)
    torch.testing.assert_close(hh, torch.nn.functional.silu(gate) * up)
    s = torch.sigmoid(gate)
    torch.testing.assert_close(dg, (dy @ wd) * up * s * (1 + gate * (1 - s)))
    torch.testing.assert_close(du, (dy @ wd) * gate * s)
    q = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(1, 3, 6, dtype=torch.float64), torch.randn(1, 3, 6, dtype=torch.float64)
    rq = q * cos[:, :, None] + reference.rotate_half(q) * sin[:, :, None]
    dq_out = torch.randn_like(rq)
    (gq,) = torch.autograd.grad(rq, q, dq_out)
    torch.testing.assert_close(reference.rope(dq_out, dq_out[:, :, :1], cos, sin, True)[0], gq)


def test_rms_norm_cast_order_matches_hugging_face():
    """bf16 x with an fp32 weight gives an fp32 output, the normalized value rounded to bf16 first (LlamaRMSNorm)."""
    x, w = torch.randn(6, 16).bfloat16(), torch.randn(16)
    xf = x.float()
    expect = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    for backend in ("reference", "cpp"):
        with ckpt_ext.set_backend(backend):
            y, _ = ops.rms_norm_fwd(x, w, 1e-6)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_every_op(backend, requires_grad):
    covered = set()
    with ckpt_ext.set_backend(backend):
        for op, args in sample_calls(requires_grad):
            torch.library.opcheck(op, args)
            covered.add(op._name)
    assert covered == set(ops.__all__)


def test_gradcheck_differentiable_ops_float64():
    x, w, b = _ln_inputs(5, 6, torch.float64, requires_grad=True)
    u = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    qkv = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 1, 1, 5, dtype=torch.float64)
    mask[0, ..., 4] = -1e9
    with ckpt_ext.set_backend("reference"):
        assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm_fwd(x, w, b, 1e-5)[0], (x, w, b))
        for approx in APPROX:
            assert torch.autograd.gradcheck(lambda u, bias, a=approx: ops.bias_gelu(u, bias, a), (u, bias))
        res = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda u, r: ops.dropout_add(u, r, 0.4, 3), (u, res))
        w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
        r5 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        for p in (0.0, 0.4):
            fn = lambda u, w, b, r, p=p: ops.linear_dropout_add(u, w, b, r, p, 7)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (u, w, bias[:5].detach().requires_grad_(True), r5))
        for causal, p, m in [(True, 0.0, None), (False, 0.3, mask), (True, 0.2, mask)]:
            fn = lambda q, c=causal, p=p, m=m: ops.attention_fwd(q, 2, c, p, 9, m)[0]  # noqa: E731
            assert torch.autograd.gradcheck(fn, (qkv,))


@pytest.mark.parametrize("approx", APPROX)
def test_fused_backward_ops_match_autograd_of_forward_math(approx):
    """ffn_recompute / linear_gelu_bwd / gelu_linear_wgrad / layer_norm_bwd equal autograd through the plain forward."""
    torch.manual_seed(1)
    n, d, h = 9, 10, 14
    x1, lw, lb = _ln_inputs(n, d, torch.float64)
    w1, b1 = torch.randn(h, d, dtype=torch.float64), torch.randn(h, dtype=torch.float64)
    w2 = torch.randn(d, h, dtype=torch.float64)
    dy = torch.randn(n, d, dtype=torch.float64)
    y, mean, rstd = reference.layer_norm_fwd(x1, lw, lb, 1e-5)
    u = (y @ w1.t() + b1).requires_grad_(True)
    a = torch.nn.functional.gelu(u, approximate=approx)
    f = a @ w2.t()
    (du_ref,) = torch.autograd.grad(f, u, dy)
    with ckpt_ext.set_backend("reference"):
        a_ours, du_ours, db1 = ops.ffn_recompute(x1, mean, rstd, lw, lb, w1, b1, dy, w2, approx)
        torch.testing.assert_close(a_ours, a.detach())
        torch.testing.assert_close(du_ours, du_ref)
        torch.testing.assert_close(db1, du_ref.sum(0))
        torch.testing.assert_close(ops.linear_bias_gelu(y, w1, b1, approx), a.detach())
        torch.testing.assert_close(ops.linear_gelu_bwd(dy, w2, u.detach(), approx), du_ref)
        torch.testing.assert_close(ops.gelu_linear_wgrad(dy, u.detach(), approx), dy.t() @ a.detach())
        xr, lwr, lbr = (t.clone().requires_grad_(True) for t in (x1, lw, lb))
        yr = torch.nn.functional.layer_norm(xr, (d,), lwr, lbr, 1e-5)
        gy = torch.randn_like(yr)
        dres = torch.randn_like(yr)
        ref_grads = torch.autograd.grad(yr, (xr, lwr, lbr), gy)
        dx, dw, db, y_emit = ops.layer_norm_bwd(gy, x1, mean, rstd, lw, lb, dres, True)
        torch.testing.assert_close(dx, ref_grads[0] + dres)
        torch.testing.assert_close(dw, ref_grads[1])
        torch.testing.assert_close(db, ref_grads[2])
        torch.testing.assert_close(y_emit, yr.detach())


def test_dropout_mask_statistics_and_reproducibility():
    for p in (0.1, 0.5, 0.9):
        keep = reference.dropout_keep_mask(200_000, p, seed=42)
        assert abs(keep.float().mean().item() - (1 - p)) < 0.005
        assert torch.equal(keep, reference.dropout_keep_mask(200_000, p, seed=42))
    a = reference.dropout_keep_mask(100_000, 0.5, seed=1)
    b = reference.dropout_keep_mask(100_000, 0.5, seed=2)
    agreement = (a == b).float().mean().item()
    assert 0.48 < agreement < 0.52  # masks of different seeds are uncorrelated


def test_flop_formulas_registered():
    from torch.utils.flop_counter import FlopCounterMode

    n, d, h = 8, 16, 32
    x1, lw, lb = _ln_inputs(n, d)
    _, mean, rstd = ops.layer_norm_fwd(x1, lw, lb, 1e-5)
    with FlopCounterMode(display=False) as counter:
        ops.ffn_recompute(
            x1, mean, rstd, lw, lb, torch.randn(h, d), torch.randn(h), torch.randn(n, d), torch.randn(d, h), "none"
        )
        ops.linear_bias_gelu(x1, torch.randn(h, d), None, "tanh")
        ops.linear_dropout_add(torch.randn(n, h), torch.randn(d, h), None, x1, 0.1, 3)
        ops.linear_gelu_bwd(torch.randn(n, d), torch.randn(d, h), torch.randn(n, h), "none")
        ops.gelu_linear_wgrad(torch.randn(n, d), torch.randn(n, h), "none")
        ops.attention_fwd(torch.randn(2, 5, 3 * d), 4, True, 0.0, 0, None)
    assert counter.get_total_flops() == 6 * 2 * n * d * h + 4 * 2 * 4 * 5 * 5 * (d // 4)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 9, 2**32 + 7, 2**40 + 3, -5])
def test_seed_key_is_fmix32_of_the_seed(seed):
    """reference.seed_key (Python ints, the launchers' hot path) equals the tensor fmix32 every kernel implements."""
    low = torch.tensor([(seed ^ 0x9E3779B9) & 0xFFFFFFFF], dtype=torch.int64)
    assert reference.seed_key(seed) == int(reference.fmix32(low).item())
