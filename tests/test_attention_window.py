"""Sliding-window attention (the ``window`` argument of ops.gqa_attention_fwd/_bwd: query t sees key s only if
|t - s| <= window) on every backend this machine runs, against the float64 reference math fed the explicit band mask.

- reference, cpp (cpu_gqa kernels for fp32 without mask/dropout, tiled cpu_math otherwise) and triton (interpreter)
  × T 1/7/33/200 × window 1/3/64 × causal × segment ids (none, right/left padding, packed) × fp32/bf16 × dropout:
  out, lse, dq, dk, dv within the tolerance rule (≤ 3× PyTorch's own same-dtype error + a floor; padded rows exactly
  zero with lse = -inf).
- a windowed call never takes aten's flash routes and never allocates a (T, T) tensor (memory profile at T = 256).
- argument errors name ``window``; opcheck with a window; float64 gradcheck through the op's autograd.
"""

from __future__ import annotations

import pytest
import torch
from test_attention_memory import largest_allocation
from test_attention_ops import brute_force

import ckpt_ext
from ckpt_ext import ops, reference_attention, segments
from ckpt_ext.backends import aten_attention

H, HK, DH = 4, 2, 8
SCALE = 0.4


def band_keep(t: int, window: int) -> torch.Tensor:
    """(T, T) bool: |i - j| <= window (the explicit band the kernels never build)."""
    i = torch.arange(t)
    return (i[:, None] - i[None, :]).abs() <= window


def make_ids(kind, b, t):
    if kind is None:
        return None
    if kind == "padding":  # right padding in row 0, left padding in row 1
        keep = torch.ones(b, t, dtype=torch.bool)
        keep[0, t - t // 3 :] = False
        keep[1, : t // 4] = False
        return segments.from_keep_mask(keep)
    cu = torch.tensor([0, t // 3, t // 3 + t // 2])  # packed: two sequences, trailing padding
    return segments.from_cu_seqlens(cu, t).expand(b, t).contiguous()


def explicit_mask(t, window, ids):
    """(B|1, 1, T, T) bool keep mask equivalent to window + segment ids."""
    keep = band_keep(t, window)[None, None]
    return keep if ids is None else keep & segments.visibility(ids)


def run_op(backend, q, k, v, dout, causal, dropout_p, ids, window):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with ckpt_ext.set_backend(backend):
        out, lse = ops.gqa_attention_fwd(*leaves, causal, dropout_p, 7, None, SCALE, ids, window)
        grads = torch.autograd.grad(out, leaves, dout)
    return out, lse, grads


def torch_error_baseline(q, k, v, dout, causal, dropout_p, mask, rows):
    """PyTorch's own error in q.dtype vs float64 (brute force with the explicit mask): per tensor, the max abs error
    over the non-empty rows ``rows`` (B, T) for out, over everything for the gradients. Empty rows get their own key
    as a dummy so brute force stays finite; dout is zero there, so the gradients are unchanged."""
    t = q.shape[1]
    m = mask | torch.eye(t, dtype=torch.bool)[None, None] & ~rows[:, None, :, None]

    def grads(dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out, _ = brute_force(*leaves, causal, dropout_p, 7, m, SCALE, dtype=dtype)
        return out, torch.autograd.grad(out, leaves, dout.to(dtype))

    (o, g), (o64, g64) = grads(q.dtype), grads(torch.float64)
    out_err = ((o.double() - o64).abs() * rows[..., None, None]).max().item()
    return [out_err] + [(a.double() - b).abs().max().item() for a, b in zip(g, g64)]


def check_window(backend, b, t, window, causal, ids_kind, dtype, dropout_p=0.0, factor=3.0):
    q, k, v = (torch.randn(b, t, n, DH).to(dtype) for n in (H, HK, HK))
    ids = make_ids(ids_kind, b, t)
    mask = explicit_mask(t, window, ids).expand(b, 1, t, t)
    seen = mask[:, 0] & (torch.ones(t, t, dtype=torch.bool).tril() if causal else True)
    rows = seen.any(dim=-1)  # (B, T): rows with a visible key
    dout = torch.randn(b, t, H, DH).to(dtype) * rows[..., None, None]
    out, lse, grads = run_op(backend, q, k, v, dout, causal, dropout_p, ids, window)
    d64 = [x.double() for x in (dout, q, k, v)]
    o64, l64 = reference_attention.gqa_attention_fwd(*d64[1:], causal, dropout_p, 7, mask, SCALE)
    g64 = reference_attention.gqa_attention_bwd(d64[0], *d64[1:], o64, l64, causal, dropout_p, 7, mask, SCALE)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(l64)), "lse must be -inf exactly on the empty rows"
    assert bool((out[~rows] == 0).all())
    base = torch_error_baseline(q, k, v, dout, causal, dropout_p, mask, rows)
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    for name, ours, ref, err in zip(("out", "dq", "dk", "dv"), (out, *grads), (o64, *g64), base):
        tol = factor * err + floor
        torch.testing.assert_close(ours.double(), ref, rtol=0, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
    finite = ~torch.isneginf(l64)
    lse_tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse.double()[finite], l64[finite], rtol=0, atol=lse_tol)


SHAPES = [(1, 1), (1, 3), (7, 1), (7, 3), (33, 3), (33, 64), (200, 1), (200, 64)]  # (T, window)


@pytest.mark.parametrize("t, window", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ids_kind", [None, "padding", "packed"])
def test_cpp_window_fp32_matches_band_masked_reference(t, window, causal, ids_kind):
    """fp32 without mask or dropout: ckpt_ext._C's cpu_gqa kernels with the window argument."""
    check_window("cpp", 2, t, window, causal, ids_kind, torch.float32)


@pytest.mark.parametrize("t, window", [(7, 3), (33, 64), (200, 1), (200, 64)])
@pytest.mark.parametrize("causal, ids_kind", [(False, None), (True, "padding"), (False, "packed")])
@pytest.mark.parametrize("dtype, backend", [(torch.bfloat16, "cpp"), (torch.bfloat16, "reference"),
                                            (torch.float32, "reference")])  # fmt: skip
def test_window_matches_band_masked_reference(backend, t, window, causal, ids_kind, dtype):
    """bf16 on cpp: the tiled cpu_math route (key tiles t0 - w .. t1 + w); the reference math in fp32 and bf16."""
    check_window(backend, 2, t, window, causal, ids_kind, dtype)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("t, window", [(70, 3), (200, 64)])
def test_cpu_math_route_with_window_mask_and_dropout(t, window, dropout_p):
    """The tiled route (key tiles from t0 - w, dropout hashed at the tile's key offset) with an attn_mask too."""
    b = 2
    q, k, v = (torch.randn(b, t, n, DH) for n in (H, HK, HK))
    am = torch.zeros(b, 1, 1, t).masked_fill_(torch.rand(b, 1, 1, t) < 0.2, torch.finfo(torch.float32).min)
    dout = torch.randn(b, t, H, DH)
    assert aten_attention._route_gqa(q, k, v, dropout_p, am, None, window) == "cpu_math"
    out = aten_attention.gqa_attention_fwd(q, k, v, False, dropout_p, 5, am, SCALE, None, window)
    grads = aten_attention.gqa_attention_bwd(dout, q, k, v, *out, False, dropout_p, 5, am, SCALE, None, window)
    full = torch.where(band_keep(t, window), am, torch.tensor(float("-inf")))  # (B, 1, T, T)
    d64 = [x.double() for x in (dout, q, k, v)]
    o64, l64 = reference_attention.gqa_attention_fwd(*d64[1:], False, dropout_p, 5, full.double(), SCALE)
    g64 = reference_attention.gqa_attention_bwd(d64[0], *d64[1:], o64, l64, False, dropout_p, 5, full.double(), SCALE)
    for ours, ref in zip((*out, *grads), (o64, l64, *g64)):
        torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=2e-5)


def test_window_routes_never_take_aten_flash():
    q, k, v = (torch.randn(2, 40, n, DH) for n in (H, HK, HK))
    ids = make_ids("padding", 2, 40)
    assert aten_attention._route_gqa(q, k, v, 0.0, None, ids, 4) == "cpu_gqa"
    assert aten_attention._route_gqa(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.0, None, ids, 4) == "cpu_math"
    assert aten_attention._route_gqa(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.0, None, ids, 0) == "cpu_flash"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_window_allocates_no_t_by_t_tensor(backend, dtype):
    """T = 256, w = 8: the largest allocation stays below one (T, T) fp32 matrix (the reference builds its (B, T, S)
    scores per head, so it is only checked against (B, h, T, T))."""
    b, t = 2, 256
    q, k, v = (torch.randn(b, t, n, DH, dtype=dtype, requires_grad=True) for n in (H, HK, HK))
    ids = make_ids("padding", b, t)

    def step():
        out, _ = ops.gqa_attention_fwd(q, k, v, False, 0.0, 0, None, SCALE, ids, 8)
        out.sum().backward()

    with ckpt_ext.set_backend(backend):
        largest = largest_allocation(step)
    limit = t * t * 4 if backend == "cpp" else b * H * t * t * 4
    assert largest < limit, (largest, limit)


def test_window_argument_errors_name_it():
    q, k, v = (torch.randn(1, 5, n, DH) for n in (H, HK, HK))
    with pytest.raises(ValueError, match="window"):
        ops.gqa_attention_fwd(q, k, v, False, 0.0, 0, None, SCALE, None, -1)
    with pytest.raises(ValueError, match="window"):
        ops.gqa_attention_fwd(q, k[:, :3], v[:, :3], False, 0.0, 0, None, SCALE, None, 2)
    with pytest.raises(TypeError, match="window"):
        reference_attention.check_gqa_args(q, k, v, False, 0.0, None, SCALE, window=True)
    with pytest.raises(TypeError, match="window"):
        reference_attention.check_gqa_args(q, k, v, False, 0.0, None, SCALE, window=2.0)
    out, lse = ops.gqa_attention_fwd(q, k, v, False, 0.0, 0, None, SCALE, None, 2)
    with pytest.raises(ValueError, match="window"):
        ops.gqa_attention_bwd(out, q, k, v, out, lse, False, 0.0, 0, None, SCALE, None, -3)


def test_window_changes_the_result():
    """The window is applied (a test of the tests: w = 2 differs from no window at T = 16)."""
    q, k, v = (torch.randn(1, 16, n, DH) for n in (H, HK, HK))
    full = ops.gqa_attention_fwd(q, k, v, False, 0.0, 0, None, SCALE, None, 0)[0]
    local = ops.gqa_attention_fwd(q, k, v, False, 0.0, 0, None, SCALE, None, 2)[0]
    assert (full - local).abs().max() > 1e-3


def test_flop_count_bounds_every_backend_with_a_window():
    """FlopCounterMode counts a windowed layer densely (4·h·T·S·dh forward, 10·h·T·S·dh backward): the reference
    backend computes every score and masks the band, so only the dense count bounds the work of every launcher."""
    from torch.utils.flop_counter import FlopCounterMode

    t, w = 64, 4
    q, k, v = (torch.randn(1, t, n, DH, requires_grad=True) for n in (H, HK, HK))
    counts = []
    for window in (0, w):
        with FlopCounterMode(display=False) as counter:
            out, _ = ops.gqa_attention_fwd(q, k, v, False, 0.0, 0, None, SCALE, None, window)
            out.backward(torch.ones_like(out))
        counts.append(counter.get_total_flops())
    assert counts == [14 * H * t * t * DH] * 2


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_opcheck_with_window(backend):
    q, k, v = (torch.randn(2, 9, n, DH, requires_grad=True) for n in (H, HK, HK))
    ids = make_ids("packed", 2, 9)
    with ckpt_ext.set_backend(backend):
        torch.library.opcheck(ops.gqa_attention_fwd, (q, k, v, True, 0.0, 3, None, SCALE, ids, 2))
        out, lse = ops.gqa_attention_fwd(q, k, v, True, 0.0, 3, None, SCALE, ids, 2)
        dout = torch.randn_like(out)
        args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), True, 0.0, 3, None, SCALE, ids, 2)
        torch.library.opcheck(ops.gqa_attention_bwd, args)


def test_gradcheck_float64_with_window():
    q, k, v = (torch.randn(2, 6, n, 3, dtype=torch.float64, requires_grad=True) for n in (H, HK, HK))
    with ckpt_ext.set_backend("reference"):
        fn = lambda q, k, v: ops.gqa_attention_fwd(q, k, v, False, 0.2, 9, None, 0.6, None, 1)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v))


# ------------------------------------------------------------------------------------------------ triton lane
@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy evaluates both sides of tl.where
@pytest.mark.parametrize(
    "t, window, causal, ids_kind, dtype, dropout_p",
    [
        (1, 1, False, None, torch.float32, 0.0),
        (7, 3, True, None, torch.float32, 0.0),
        (33, 3, False, "padding", torch.float32, 0.0),
        (33, 1, True, "packed", torch.float32, 0.2),
        (70, 3, False, None, torch.float32, 0.0),
        (33, 64, False, "padding", torch.bfloat16, 0.0),
        (40, 3, True, "padding", torch.bfloat16, 0.0),
    ],
)
def test_triton_window_matches_band_masked_reference(t, window, causal, ids_kind, dtype, dropout_p):
    check_window("triton", 2, t, window, causal, ids_kind, dtype, dropout_p)
