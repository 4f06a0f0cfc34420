"""The C++ CPU kernels (csrc/cpu) against the reference math: opcheck, parity at awkward shapes, bit-exact dropout
masks, bitwise-deterministic LayerNorm weight gradients, the fused FFN ops (ffn_recompute, linear_bias_gelu,
linear_gelu_bwd, gelu_linear_wgrad: rows 1/7/1000, d 72/200, H not a multiple of 8/16, strided weights, both GELU
forms, with and without bias, fp32/bf16, fp64 end to end, fp16, mixed dtypes) and the whole FusedCheckpointBlock under
set_backend("cpp") for every policy.

Parity rule (flash-attention style): our error against a float64 reference is at most 3x the error of the reference
math run in the test dtype, plus a small atol.
"""

import os

import pytest
import torch
from test_cpp_llama_kernels import LLAMA_OPS  # tests/ is on sys.path (pytest's rootdir import mode)
from test_linear_cross_entropy import _op_samples as lm_head_samples

import ckpt_ext
from ckpt_ext import reference, reference_attention

# `make test` always builds ckpt_ext._C: a missing extension must fail this file loudly, never skip it.
from ckpt_ext.backends.cpp import bridge as cpp_bridge  # noqa: E402  (loads _C and registers the kernel ops' fake kernels)

K = torch.ops.ckpt_ext
SHAPES = [(1, 72), (7, 200), (1000, 1000)]
DTYPES = [torch.float32, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _assert_parity(ours, ref_dt, ref64, dtype, factor=3.0):
    """max |ours - ref64| <= factor * max |ref_dt - ref64| + atol, and ours has ref_dt's dtype and shape."""
    assert ours.dtype == ref_dt.dtype and ours.shape == ref_dt.shape
    if ours.numel() == 0:
        return
    ref_err = (ref_dt.double() - ref64.double()).abs().max().item()
    torch.testing.assert_close(ours.double(), ref64.double(), atol=factor * ref_err + ATOL[dtype], rtol=0)


def _run_both(fn, *args):
    """fn on the inputs as given and on float64 copies of the floating ones."""
    up = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    return fn(*args), fn(*up)


def _ln_inputs(n, d, dtype):
    x = (torch.randn(n, d) * 2 + 0.5).to(dtype)
    return x, torch.randn(d).to(dtype), torch.randn(d).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", SHAPES)
def test_layer_norm_fwd(n, d, dtype):
    x, w, b = _ln_inputs(n, d, dtype)
    ours = K.layer_norm_fwd_kernel(x, w, b, 1e-5)
    ref, ref64 = _run_both(reference.layer_norm_fwd, x, w, b, 1e-5)
    for o, r, r64 in zip(ours, ref, ref64):
        _assert_parity(o, r, r64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("with_residual, emit_y", [(False, False), (True, True)])
def test_layer_norm_bwd(n, d, dtype, with_residual, emit_y):
    x, w, b = _ln_inputs(n, d, dtype)
    _, mean, rstd = reference.layer_norm_fwd(x, w, b, 1e-5)
    dy = torch.randn(n, d).to(dtype)
    dres = torch.randn(n, d).to(dtype) if with_residual else None
    ours = K.layer_norm_bwd_kernel(dy, x, mean, rstd, w, b, dres, emit_y)
    ref, ref64 = _run_both(reference.layer_norm_bwd, dy, x, mean, rstd, w, b, dres, emit_y)
    for o, r, r64 in zip(ours, ref, ref64):
        _assert_parity(o, r, r64, dtype)


def test_layer_norm_bwd_noncontiguous_and_mixed_dtypes():
    x, w, b = _ln_inputs(33, 80, torch.bfloat16)
    _, mean, rstd = reference.layer_norm_fwd(x, w, b, 1e-5)
    dy = torch.randn(80, 33).t()  # float32, transposed
    dres = torch.randn(33, 80)
    ours = K.layer_norm_bwd_kernel(dy, x, mean, rstd, w, b, dres, True)
    ref = reference.layer_norm_bwd(dy, x, mean, rstd, w, b, dres, True)
    for o, r in zip(ours, ref):
        assert o.dtype == r.dtype
        torch.testing.assert_close(o, r, atol=2e-2, rtol=2e-2)


def test_layer_norm_bwd_weight_grads_are_bitwise_deterministic():
    x, w, b = _ln_inputs(3001, 384, torch.float32)
    _, mean, rstd = reference.layer_norm_fwd(x, w, b, 1e-5)
    dy = torch.randn_like(x)
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, threads, 1, threads):
            torch.set_num_threads(t)
            runs.append(K.layer_norm_bwd_kernel(dy, x, mean, rstd, w, b, None, False)[1:3])
    finally:
        torch.set_num_threads(threads)
    for dw, db in runs[1:]:
        assert torch.equal(dw, runs[0][0]) and torch.equal(db, runs[0][1])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, h", SHAPES)
def test_gelu(n, h, dtype, approximate):
    x = (torch.randn(n, h) * 3).to(dtype)
    bias = torch.randn(h).to(dtype)
    for bb in (bias, None):
        ours = K.bias_gelu_kernel(x, bb, approximate)
        _assert_parity(ours, *_run_both(reference.bias_gelu, x, bb, approximate), dtype)
    da = torch.randn(n, h).to(dtype)
    ours = K.gelu_bwd_kernel(da, x, approximate)
    _assert_parity(ours, *_run_both(reference.gelu_bwd, da, x, approximate), dtype)


def test_gelu_bwd_float32_grad_of_bfloat16_preactivation():
    u = torch.randn(5, 77).to(torch.bfloat16)
    da = torch.randn(5, 77)
    torch.testing.assert_close(K.gelu_bwd_kernel(da, u, "none"), reference.gelu_bwd(da, u, "none"), atol=0, rtol=0)


def test_gelu_rejects_unknown_approximate():
    with pytest.raises(RuntimeError, match="approximate"):
        K.bias_gelu_kernel(torch.randn(2, 3), None, "sigmoid")


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 7, 2**31 - 9, -3])
def test_dropout_mask_bit_exact(p, seed):
    numel = 4099
    ones = torch.ones(numel)
    kept = K.dropout_add_kernel(ones, None, p, seed) != 0
    assert torch.equal(kept, reference.dropout_keep_mask(numel, p, seed))


@pytest.mark.parametrize(
    "dtype, res_dtype",
    [
        (torch.float32, None),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_dropout_add_values(dtype, res_dtype):
    x = torch.randn(7, 200).to(dtype)
    res = None if res_dtype is None else torch.randn(200, 7).t().to(res_dtype)
    ours = K.dropout_add_kernel(x, res, 0.3, 11)
    ref = reference.dropout_add(x, res, 0.3, 11)
    assert ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_dropout_add_never_aliases():
    x = torch.randn(4, 8)
    out = K.dropout_add_kernel(x, None, 0.0, 1)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


# -------------------------------------------------------------------------------------------------- fused FFN
FFN_SHAPES = [(1, 72, 200), (7, 200, 72), (1000, 72, 200), (7, 72, 37)]  # (N, d, H); 200, 72, 37 % 16 != 0


def _strided(w, strided):
    """w itself, or the same values through a column-major view (w.t().contiguous().t(), as a Conv1D weight)."""
    return w.t().contiguous().t() if strided else w


def _ffn_inputs(n, d, h, dtype, strided=False):
    x1, lw, lb = _ln_inputs(n, d, dtype)
    _, mean, rstd = reference.layer_norm_fwd(x1, lw, lb, 1e-5)
    w1 = _strided((torch.randn(h, d) * d**-0.5).to(dtype), strided)
    b1 = torch.randn(h).to(dtype)
    dy = torch.randn(n, d).to(dtype)
    w2 = _strided((torch.randn(d, h) * d**-0.5).to(dtype), strided)
    return x1, mean, rstd, lw, lb, w1, b1, dy, w2


def _assert_fresh(outs, inputs):
    ptrs = {t.data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
    assert all(o.data_ptr() not in ptrs for o in outs if o.numel())


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d, h", FFN_SHAPES)
def test_ffn_recompute(n, d, h, dtype, approximate, strided):
    args = (*_ffn_inputs(n, d, h, dtype, strided), approximate)
    ours = K.ffn_recompute_kernel(*args)
    ref, ref64 = _run_both(reference.ffn_recompute, *args)
    for o, r, r64 in zip(ours, ref, ref64):
        _assert_parity(o, r, r64, dtype, factor=4.0)
    _assert_fresh(ours, args)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d, h", FFN_SHAPES)
def test_linear_gelu_bwd_and_wgrad(n, d, h, dtype, approximate, strided):
    dy = torch.randn(n, d).to(dtype)
    w2 = _strided((torch.randn(d, h) * h**-0.5).to(dtype), strided)
    u = (torch.randn(n, h) * 2).to(dtype)
    ours = K.linear_gelu_bwd_kernel(dy, w2, u, approximate)
    _assert_parity(ours, *_run_both(reference.linear_gelu_bwd, dy, w2, u, approximate), dtype, factor=4.0)
    dyt = _strided(dy, strided)  # a transposed-layout dy too
    ours_w = K.gelu_linear_wgrad_kernel(dyt, u, approximate)
    _assert_parity(ours_w, *_run_both(reference.gelu_linear_wgrad, dyt, u, approximate), dtype, factor=4.0)
    _assert_fresh([ours, ours_w], (dy, w2, u))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d, h", FFN_SHAPES)
def test_linear_bias_gelu(n, d, h, dtype, approximate, strided, with_bias):
    x = (torch.randn(n, d) * 2).to(dtype)
    w = _strided((torch.randn(h, d) * d**-0.5).to(dtype), strided)
    b = torch.randn(h).to(dtype) if with_bias else None
    ours = K.linear_bias_gelu_kernel(x, w, b, approximate)
    _assert_parity(ours, *_run_both(reference.linear_bias_gelu, x, w, b, approximate), dtype, factor=4.0)
    _assert_fresh([ours], (x, w, b))


def test_linear_bias_gelu_float64_float16_and_mixed_dtypes():
    x, b = torch.randn(9, 40, dtype=torch.float64), None
    w = _strided(torch.randn(52, 40, dtype=torch.float64), True)
    for approximate in ("none", "tanh"):
        for bias in (b, torch.randn(52, dtype=torch.float64)):
            ours = K.linear_bias_gelu_kernel(x, w, bias, approximate)
            assert ours.dtype == torch.float64
            ref = reference.linear_bias_gelu(x, w, bias, approximate)
            torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    xh, wh, bh = x.half(), w.half(), torch.randn(52).half()
    ours, ref = K.linear_bias_gelu_kernel(xh, wh, bh, "tanh"), reference.linear_bias_gelu(xh, wh, bh, "tanh")
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours, ref, atol=2e-2, rtol=2e-2)
    # autocast-like mixes: bf16 activations with fp32 weights (fp32 GEMM, bf16 out), fp32 x with a bf16 bias
    for xm, wm, bm in ((x.bfloat16(), w.float(), bh.float()), (x.float(), w.float(), bh.bfloat16())):
        ours, ref = K.linear_bias_gelu_kernel(xm, wm, bm, "none"), reference.linear_bias_gelu(xm, wm, bm, "none")
        assert ours.dtype == xm.dtype
        torch.testing.assert_close(ours, ref, atol=1e-2, rtol=1e-2)
    empty = K.linear_bias_gelu_kernel(torch.randn(0, 40), torch.randn(52, 40), None, "none")
    assert empty.shape == (0, 52)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_ffn_ops_float64_end_to_end(approximate):
    args = (*_ffn_inputs(9, 40, 52, torch.float64, strided=True), approximate)
    for o, r in zip(K.ffn_recompute_kernel(*args), reference.ffn_recompute(*args)):
        assert o.dtype == torch.float64
        torch.testing.assert_close(o, r, atol=1e-12, rtol=1e-12)
    dy, w2, u = args[7], args[8], torch.randn(9, 52, dtype=torch.float64)
    for ours, ref in (
        (K.linear_gelu_bwd_kernel(dy, w2, u, approximate), reference.linear_gelu_bwd(dy, w2, u, approximate)),
        (K.gelu_linear_wgrad_kernel(dy, u, approximate), reference.gelu_linear_wgrad(dy, u, approximate)),
    ):
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)


def test_ffn_ops_float16():
    args = (*_ffn_inputs(7, 72, 40, torch.float16), "none")
    for o, r in zip(K.ffn_recompute_kernel(*args), reference.ffn_recompute(*args)):
        assert o.dtype == r.dtype  # a, du float16; db1 float32
        torch.testing.assert_close(o, r, atol=2e-2, rtol=2e-2)
    dy, w2, u = args[7], args[8], torch.randn(7, 40).half()
    ours, ref = K.linear_gelu_bwd_kernel(dy, w2, u, "tanh"), reference.linear_gelu_bwd(dy, w2, u, "tanh")
    torch.testing.assert_close(ours, ref, atol=2e-2, rtol=2e-2)
    ours, ref = K.gelu_linear_wgrad_kernel(dy, u, "tanh"), reference.gelu_linear_wgrad(dy, u, "tanh")
    torch.testing.assert_close(ours, ref, atol=5e-2, rtol=2e-2)


def test_ffn_recompute_bfloat16_under_float32_statistics():
    """Autocast's case: x1 float32 (the residual stream), weights and dy bfloat16: a, dU in bfloat16, db1 float32."""
    x1, mean, rstd, lw, lb, w1, b1, dy, w2 = _ffn_inputs(33, 72, 200, torch.float32)
    args = (x1, mean, rstd, lw, lb, w1.bfloat16(), b1.bfloat16(), dy.bfloat16(), w2.bfloat16(), "tanh")
    ours = K.ffn_recompute_kernel(*args)
    ref, ref64 = _run_both(reference.ffn_recompute, *args)
    for o, r, r64 in zip(ours, ref, ref64):
        _assert_parity(o, r, r64, torch.bfloat16, factor=4.0)


# ------------------------------------------------------------------------------------------------------ opcheck
def _op_samples():
    x, w, b = _ln_inputs(6, 40, torch.float32)
    _, mean, rstd = reference.layer_norm_fwd(x, w, b, 1e-5)
    dy = torch.randn_like(x)
    ffn = _ffn_inputs(6, 40, 24, torch.float32)
    ffn_bf = _ffn_inputs(70, 40, 24, torch.bfloat16, strided=True)
    u = torch.randn(6, 24)
    w2 = torch.randn(24, 40).t()
    w1 = torch.randn(40, 24).t()  # (24, 40) strided
    return {
        "ffn_recompute": [(*ffn, "none"), (*ffn_bf, "tanh")],
        "linear_gelu_bwd": [(dy, w2, u, "tanh"), (dy.bfloat16(), w2.bfloat16(), u.bfloat16(), "none")],
        "gelu_linear_wgrad": [(dy, u, "none"), (dy.bfloat16(), u.bfloat16(), "tanh")],
        "linear_bias_gelu": [(x, w1, ffn[6], "tanh"), (ffn_bf[0], ffn_bf[5], None, "none")],
        "layer_norm_fwd": [(x, w, b, 1e-5), (x.double(), w.double(), b.double(), 1e-6)],
        "layer_norm_bwd": [(dy, x, mean, rstd, w, b, None, False), (dy, x, mean, rstd, w, b, dy.clone(), True)],
        "bias_gelu": [(x, w, "none"), (x.bfloat16(), None, "tanh")],
        "gelu_bwd": [(dy, x, "tanh"), (dy.bfloat16(), x.bfloat16(), "none")],
        "dropout_add": [(x, dy, 0.25, 5), (x.bfloat16(), None, 0.0, 3)],
    }


def test_every_kernel_op_has_samples():
    """Here or, for the Llama-family ops, in test_cpp_llama_kernels.py, and for the LM head's in
    test_linear_cross_entropy.py (each opchecks them)."""
    names = {op._schema.name.split("::")[1].removesuffix("_kernel") for op in cpp_bridge.KERNEL_OPS}
    lm_head = {op._name.split("::")[-1] for op, _ in lm_head_samples()}
    assert names == set(_op_samples()) | set(LLAMA_OPS) | lm_head


@pytest.mark.parametrize("name", sorted(_op_samples()))
def test_opcheck_kernel_op(name):
    op = getattr(K, f"{name}_kernel").default
    assert op in cpp_bridge.KERNEL_OPS
    for args in _op_samples()[name]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", sorted(_op_samples()))
def test_opcheck_graph_op_cpp_backend(name):
    op = getattr(K, name).default
    grad_ok = name in ("layer_norm_fwd", "bias_gelu", "dropout_add")
    with ckpt_ext.set_backend("cpp"):
        for args in _op_samples()[name]:
            if grad_ok:
                args = tuple(a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                             for a in args)  # fmt: skip
            torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------------------- whole block
@pytest.mark.parametrize("policy", sorted(ckpt_ext.POLICIES))
@pytest.mark.parametrize("dropout, activation", [(0.0, "gelu_tanh"), (0.2, "gelu_tanh"), (0.2, "gelu")])
def test_block_cpp_matches_reference(policy, dropout, activation):
    torch.manual_seed(1)
    block = ckpt_ext.FusedCheckpointBlock(48, 4, policy=policy, dropout=dropout, activation=activation)
    x = torch.randn(2, 9, 48)
    results = {}
    for name in ("reference", "cpp"):
        block.zero_grad()
        xg = x.clone().requires_grad_()
        torch.manual_seed(123)
        with ckpt_ext.set_backend(name):
            out = block(xg)
            out.backward(torch.ones_like(out) + out.detach())
        results[name] = [out.detach(), xg.grad] + [p.grad.clone() for p in block.parameters()]
    for ours, ref in zip(results["cpp"], results["reference"]):
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_run_on_torchs_threads(threads):
    """at::parallel_for inside _C uses torch's thread count (it silently runs serially if built without -fopenmp)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert K.cpu_threads_used() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gelu_kernels_at_extreme_inputs(dtype, approximate):
    """±inf, NaN, huge and tiny pre-activations (vector lanes and scalar tail): same values as torch's GELU."""
    special = [float("-inf"), -1e4, -100.0, -20.0, -9.0, -5.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 5.0, 9.0, 20.0, 100.0,
               1e4, float("inf"), float("nan")]  # fmt: skip
    u = torch.tensor(special * 3, dtype=dtype)  # 54 values: full vectors and a scalar tail
    da = torch.linspace(-2, 2, u.numel(), dtype=dtype)
    ours_fwd = K.bias_gelu_kernel(u, None, approximate)
    ours_bwd = K.gelu_bwd_kernel(da, u, approximate)
    ref_fwd = torch.nn.functional.gelu(u.double(), approximate=approximate).to(dtype)
    ref_bwd = torch.ops.aten.gelu_backward(da.double(), u.double(), approximate=approximate).to(dtype)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(ours_fwd, ref_fwd, equal_nan=True, **tol)
    torch.testing.assert_close(ours_bwd, ref_bwd, equal_nan=True, **tol)


def test_one_openmp_runtime_in_the_process():
    """_C links torch's OpenMP runtime (libgomp by soname: the copy torch loaded); a second one would oversubscribe."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f}
    runtimes = {p for p in paths if any(name in os.path.basename(p) for name in ("libgomp", "libiomp5", "libomp"))}
    assert len(runtimes) <= 1, runtimes


@pytest.mark.parametrize("dtype", DTYPES)
def test_ffn_recompute_is_bitwise_independent_of_threads(dtype):
    """a, du and db1 (fixed 32-row partials summed in order) are the same bits on 1 and 2 threads."""
    args = _ffn_inputs(1000, 72, 200, dtype)
    before = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2, 1, 2):
            torch.set_num_threads(t)
            runs.append(K.ffn_recompute_kernel(*args, "none"))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


def _attention_mask(kind, b, t):
    if kind == "bool":
        keep = torch.rand(b, 1, t, t) > 0.3
        return keep | torch.eye(t, dtype=torch.bool)  # no row fully masked
    return torch.randn(b, 1, 1, t) if kind == "float" else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal, dropout_p, mask", [(True, 0.3, None), (False, 0.2, "bool"), (True, 0.0, "float"),
                                                     (False, 0.5, "float")])  # fmt: skip
def test_attention_cpp_routes_match_reference(dtype, causal, dropout_p, mask):
    """With dropout the cpp backend's attention runs tiled aten math + the int32 hash; a mask without dropout goes to
    aten's CPU flash kernel when it is bool or q's dtype: the same masks (bit for bit) and values as
    reference.attention_*, forward and backward, within the tolerance rule."""
    from ckpt_ext.backends import aten_attention as native_attention

    b, t, heads, d = 3, 33, 4, 72
    qkv, dout = torch.randn(b, t, 3 * d).to(dtype), torch.randn(b, t, d).to(dtype)
    m = _attention_mask(mask, b, t)
    args = (heads, causal, dropout_p, 11, m)
    flash = dropout_p == 0 and m is not None and m.dtype in (torch.bool, dtype)
    assert native_attention._route(qkv, heads, dropout_p, m) == ("cpu_flash" if flash else "cpu_math")
    if dropout_p == 0 and dtype == torch.float32:
        assert native_attention._route(qkv, heads, dropout_p, None) == "cpu_gqa"
    out, lse = native_attention.attention_fwd(qkv, *args)
    dqkv = native_attention.attention_bwd(dout, qkv, out, lse, *args)
    ref_out, ref_lse = reference_attention.attention_fwd(qkv, *args)
    ref_dqkv = reference_attention.attention_bwd(dout, qkv, ref_out, ref_lse, *args)
    o64, l64 = reference_attention.attention_fwd(qkv.double(), *args)
    d64 = reference_attention.attention_bwd(dout.double(), qkv.double(), o64, l64, *args)
    # fp64: the reference is its own float64 answer, so atol is ~0: ours must use the very same dropout masks
    for ours, ref, r64 in ((out, ref_out, o64), (lse, ref_lse, l64), (dqkv, ref_dqkv, d64)):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        err = (ref.double() - r64).abs().max().item()
        torch.testing.assert_close(ours.double(), r64, rtol=0, atol=3 * err + ATOL.get(dtype, 1e-10))
    if dropout_p > 0:  # and the seed matters
        assert not torch.equal(native_attention.attention_fwd(qkv, heads, causal, dropout_p, 12, m)[0], out)
