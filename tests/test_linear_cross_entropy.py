"""ckpt_ext.linear_cross_entropy (the fused LM head), its ops, its Triton kernels and the Hugging Face loss patch.

Truth is F.cross_entropy on float64 logits; a float32/bf16 result may differ from it by at most 4x PyTorch's own error
in the same dtype (+ a small atol). The memory test reads the CPU allocator's running total from torch.profiler's
memory events (bench.head.peak_cpu_bytes): peak bytes allocated during forward + backward, gradients included.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ckpt_ext
from bench import head as bench_head
from ckpt_ext import linear_cross_entropy, ops, reference
from ckpt_ext.backend import cpp_available

BACKENDS = ["reference", "cpp"]  # make test builds ckpt_ext._C: a missing build fails the cpp cases
SHAPES = [(1, 5, 8), (7, 97, 72), (33, 1000, 8), (200, 97, 8), (33, 5, 72), (200, 1000, 72)]
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


def _case(n, v, d, dtype=torch.float32, bias=True, ignore_every=4, seed=0):
    g = torch.Generator().manual_seed(seed + 7919 * n + 31 * v + d)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * d**-0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels


def _torch_loss(hidden, weight, bias, labels, dtype=None, **kw):
    """F.cross_entropy on logits computed in ``dtype`` (default: the inputs') and upcast, as Hugging Face does."""
    num = kw.pop("num_items_in_batch", None)
    if num is not None:
        kw["reduction"] = "sum"
    cast = (lambda t: t if t is None else t.to(dtype)) if dtype is not None else (lambda t: t)
    logits = F.linear(cast(hidden), cast(weight), cast(bias))
    loss = F.cross_entropy(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), labels, **kw)
    return loss / num if num is not None else loss


def _loss_and_grads(fn, hidden, weight, bias, labels, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None, labels, **kw)
    seed = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(loss.dtype)
    grads = torch.autograd.grad((loss * seed).sum(), leaves)
    return [loss.detach(), *grads]


def _ours(hidden, weight, bias, labels, **kw):
    return linear_cross_entropy(hidden, weight, labels, bias=bias, **kw)


def assert_close_to_truth(ours, low, truth, factor=4.0, floor=None):
    """Each tensor of ``ours`` within factor × |low - truth| (+ atol: ``floor`` or the dtype's, times the magnitude) of
    float64 ``truth``; NaN where truth is NaN. bf16 cases pass floor=ATOL[bf16]: their fp32 loss carries bf16 logit
    rounding, and a mean over rows can cancel PyTorch's own error by chance."""
    for o, lo, hi in zip(ours, low, truth):
        assert o.shape == hi.shape and o.dtype == lo.dtype, (o.shape, hi.shape, o.dtype, lo.dtype)
        err = torch.nan_to_num((lo.double() - hi).abs(), nan=0.0).max().item() if hi.numel() else 0.0
        scale = 1.0 + torch.nan_to_num(hi.abs(), nan=0.0).max().item() if hi.numel() else 1.0
        atol = factor * err + (floor if floor is not None else ATOL.get(lo.dtype, 1e-6)) * scale
        torch.testing.assert_close(o.double(), hi, atol=atol, rtol=0.0, equal_nan=True)


OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.3, reduction="sum"),
    dict(num_items_in_batch=torch.tensor(13)),
    dict(num_items_in_batch=5, label_smoothing=0.2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, v, d", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_cross_entropy(backend, n, v, d, bias):
    hidden, weight, b, labels = _case(n, v, d, bias=bias)
    for kw in OPTIONS:
        truth = _loss_and_grads(_torch_loss, hidden.double(), weight.double(), b.double() if bias else None, labels,
                                **kw)  # fmt: skip
        low = _loss_and_grads(_torch_loss, hidden, weight, b, labels, **kw)
        for chunk_bytes in (None, 4 * v * 3):  # one chunk; 3-row chunks
            with ckpt_ext.set_backend(backend):
                ours = _loss_and_grads(_ours, hidden, weight, b, labels, chunk_bytes=chunk_bytes, **kw)
            assert_close_to_truth(ours, low, truth)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    hidden, weight, b, labels = _case(7, 97, 8, ignore_every=0)
    labels[:] = -100
    for kw in (dict(), dict(reduction="sum"), dict(num_items_in_batch=3)):
        expected = _loss_and_grads(_torch_loss, hidden, weight, b, labels, **kw)
        with ckpt_ext.set_backend(backend):
            got = _loss_and_grads(_ours, hidden, weight, b, labels, **kw)
        for e, o in zip(expected, got):
            torch.testing.assert_close(o, e, equal_nan=True)  # mean: NaN as F.cross_entropy; zero gradients


def test_int32_labels_and_custom_ignore_index():
    hidden, weight, b, labels = _case(33, 97, 8, ignore_every=0)
    labels[::3] = 5
    expected = _loss_and_grads(_torch_loss, hidden, weight, b, labels, ignore_index=5)
    got = _loss_and_grads(_ours, hidden, weight, b, labels.to(torch.int32), ignore_index=5)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, v, d", [(33, 97, 72), (200, 1000, 8)])
def test_bf16_autocast(backend, n, v, d):
    """fp32 parameters under CPU bf16 autocast vs Hugging Face's path (autocast linear, logits.float())."""
    hidden, weight, b, labels = _case(n, v, d)

    def hf(h, w, bb, y, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(F.linear(h, w, bb).float(), y, **kw)

    def ours(h, w, bb, y, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(h, w, y, bias=bb, chunk_bytes=4 * v * 16, **kw)

    rounded = [t.to(torch.bfloat16).double() for t in (hidden, weight, b)]  # what autocast feeds the GEMM
    for kw in (dict(), dict(label_smoothing=0.1, reduction="sum")):
        truth = _loss_and_grads(_torch_loss, *rounded, labels, **kw)
        low = _loss_and_grads(hf, hidden, weight, b, labels, **kw)
        with ckpt_ext.set_backend(backend):
            got = _loss_and_grads(ours, hidden, weight, b, labels, **kw)
        assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
        assert_close_to_truth(got, low, truth, floor=ATOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_over_many_chunks(backend):
    """bf16 tensors over many chunks both ways (4-row forward chunks, few-column backward chunks): dhidden's sum over
    vocabulary chunks is fp32 (a bf16 running sum would add a rounding per chunk)."""
    hidden, weight, b, labels = _case(200, 97, 72, dtype=torch.bfloat16)
    truth = _loss_and_grads(_torch_loss, hidden.double(), weight.double(), b.double(), labels)
    low = _loss_and_grads(_torch_loss, hidden, weight, b, labels)
    with ckpt_ext.set_backend(backend):
        got = _loss_and_grads(_ours, hidden, weight, b, labels, chunk_bytes=(4 + 2) * 97 * 4)  # 4-row chunks
    assert_close_to_truth(got, low, truth, floor=ATOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_weight_accumulates_both_gradients(backend):
    """GPT-2's tied embedding: the head's weight is the embedding table; autograd adds both gradients."""
    torch.manual_seed(0)
    v, d, n = 97, 16, 40
    emb = torch.nn.Embedding(v, d)
    ids = torch.randint(0, v, (n,))
    labels = torch.roll(ids, -1)
    labels[-1] = -100

    def run(loss_fn):
        table = emb.weight.detach().clone().requires_grad_()
        hidden = torch.tanh(F.embedding(ids, table))
        loss_fn(hidden, table, labels).backward()
        return table.grad

    expected = run(lambda h, w, y: F.cross_entropy(h @ w.t(), y))
    with ckpt_ext.set_backend(backend):
        got = run(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_bytes=4 * v * 7))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_frozen_weight_skips_dweight():
    hidden, weight, b, labels = _case(33, 97, 8)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, labels, bias=b).backward()
    assert h.grad is not None and weight.grad is None
    hh = hidden.clone().requires_grad_()
    _torch_loss(hh, weight, b, labels).backward()
    torch.testing.assert_close(h.grad, hh.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    hidden, weight, b, labels = _case(7, 5, 8)
    inputs = tuple(t.double().requires_grad_() for t in (hidden, weight, b))
    with ckpt_ext.set_backend(backend):
        for kw in (dict(), dict(label_smoothing=0.25, reduction="sum")):
            assert torch.autograd.gradcheck(
                lambda h, w, bb, kw=kw: linear_cross_entropy(h, w, labels, bias=bb, chunk_bytes=8 * 5 * 3, **kw),
                inputs,
            )  # fmt: skip


def _op_samples():
    hidden, weight, b, labels = _case(33, 97, 8)
    losses, lse = reference.linear_cross_entropy_fwd(hidden, weight, b, labels, -100, 0.1, 4000)
    dloss = torch.randn(33)
    hd, wd = hidden.detach(), weight.detach()
    strided_w = weight.t().contiguous().t()
    return [
        (ops.linear_cross_entropy_fwd, (hidden.requires_grad_(), weight.requires_grad_(), b, labels, -100, 0.1, 4000)),
        (ops.linear_cross_entropy_fwd, (hd, strided_w, None, labels.int(), -100, 0.0, 1 << 20)),
        (ops.linear_cross_entropy_bwd, (dloss, hd, wd, b, labels, lse, -100, 0.1, 4000, True)),
        (ops.linear_cross_entropy_bwd, (dloss, hd, strided_w, None, labels, lse, -100, 0.1, 999, False)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    with ckpt_ext.set_backend(backend):
        for op, args in _op_samples():
            torch.library.opcheck(op, args)


def test_kernel_ops_opcheck():
    """The C++ kernel ops themselves (the cpp backend routes the graph ops to them)."""
    assert cpp_available() and hasattr(torch.ops.ckpt_ext, "linear_cross_entropy_fwd_kernel"), "stale ckpt_ext._C"
    for op, args in _op_samples():
        kernel = getattr(torch.ops.ckpt_ext, f"{op._name.split('::')[-1]}_kernel")
        torch.library.opcheck(kernel, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))


def test_validation_names_the_argument():
    hidden, weight, b, labels = _case(7, 97, 8)
    bad = [
        (dict(hidden=hidden[0]), "hidden"),
        (dict(weight=weight[:, :4]), "weight"),
        (dict(weight=weight.double()), "weight dtype"),
        (dict(bias=b[:5]), "bias"),
        (dict(labels=labels.float()), "labels"),
        (dict(labels=labels[:3]), "labels"),
        (dict(labels=torch.full((7,), 97)), "labels must be in"),
        (dict(labels=torch.full((7,), -2)), "labels must be in"),
        (dict(reduction="avg"), "reduction"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(reduction="none", num_items_in_batch=3), "num_items_in_batch"),
        (dict(chunk_bytes=0), "chunk_bytes"),
    ]
    for change, message in bad:
        args = dict(hidden=hidden, weight=weight, labels=labels, bias=b)
        args.update(change)
        kw = {k: v for k, v in args.items() if k not in ("hidden", "weight", "labels")}
        with pytest.raises(ValueError, match=message):
            linear_cross_entropy(args["hidden"], args["weight"], args["labels"], **kw)


def test_chunks_come_from_a_byte_budget():
    from ckpt_ext.lm_head import chunk_len

    assert chunk_len(32 << 20, 32000, torch.float32, 2048) == 256  # forward rows: 32 MiB / (32000 · 4 B), ×16
    assert chunk_len(32 << 20, 32000, torch.float32, 10**6) == 256  # independent of N
    assert chunk_len(32 << 20, 32000, torch.bfloat16, 2048) == 160  # fp32 logits + their bf16 GEMM copy
    assert chunk_len(32 << 20, 2048, torch.float32, 32000) == 4096  # backward columns for N = 2048
    assert chunk_len(32 << 20, 32000, torch.float32, 5) == 5
    assert chunk_len(1, 10**9, torch.float32, 100) == 1


def test_memory_stays_below_a_quarter_of_the_logits():
    """N=2048, V=32000, d=64 fp32 on the default backend: peak CPU bytes allocated during fwd + bwd (gradients
    included) < 1/4 of one (N, V) fp32 logits tensor; eager F.cross_entropy needs several of them."""
    n, v, d = 2048, 32000, 64
    hidden, weight, _, labels = _case(n, v, d, bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    logits_bytes = n * v * 4

    def step(fn):
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels).backward()

    ours = bench_head.peak_cpu_bytes(lambda: step(lambda h, w, y: linear_cross_entropy(h, w, y)))
    eager = bench_head.peak_cpu_bytes(lambda: step(lambda h, w, y: F.cross_entropy(h @ w.t(), y)))
    assert eager > 2 * logits_bytes  # the measurement sees the eager logits
    assert ours < logits_bytes / 4, (ours, logits_bytes)


def test_flop_counter_counts_the_formula():
    from torch.utils.flop_counter import FlopCounterMode

    n, v, d = 33, 97, 8
    hidden, weight, _, labels = _case(n, v, d, bias=False)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        linear_cross_entropy(h, w, labels).backward()
    flops = counter.get_flop_counts()["Global"]
    assert flops[torch.ops.ckpt_ext.linear_cross_entropy_fwd] == 2 * n * v * d
    assert flops[torch.ops.ckpt_ext.linear_cross_entropy_bwd] == 6 * n * v * d
    assert counter.get_total_flops() == 8 * n * v * d
    with FlopCounterMode(display=False) as counter:
        linear_cross_entropy(h, weight.detach(), labels).backward()  # frozen head: no dweight GEMM
    assert counter.get_total_flops() == 6 * n * v * d


def test_no_grad_forward_keeps_nothing():
    hidden, weight, b, labels = _case(33, 97, 8)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), weight, labels, bias=b)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _torch_loss(hidden.detach(), weight, b, labels), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- Triton interpreter
@pytest.mark.triton
@pytest.mark.parametrize("n, v, d", [(33, 97, 8), (7, 5, 72), (1, 200, 8)])
def test_triton_kernels_fp32(n, v, d):
    pytest.importorskip("triton")
    hidden, weight, b, labels = _case(n, v, d)
    for kw in (dict(), dict(label_smoothing=0.2, reduction="sum")):
        truth = _loss_and_grads(_torch_loss, hidden.double(), weight.double(), b.double(), labels, **kw)
        low = _loss_and_grads(_torch_loss, hidden, weight, b, labels, **kw)
        with ckpt_ext.set_backend("triton"):
            got = _loss_and_grads(_ours, hidden, weight, b, labels, chunk_bytes=4 * v * 16, **kw)
        assert_close_to_truth(got, low, truth)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton), "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, v, d", [(33, 97, 72), (200, 1000, 72), (1000, 50257, 64)])
def test_kernels_on_a_gpu(n, v, d, dtype, backend):
    """On a GPU: the Triton kernels (the default backend there: tensor-core bf16 tiles, V splits, several chunks) and
    csrc/cuda/cross_entropy_cuda.cu (the cuda backend: cuBLAS per chunk, ATen row passes), ignored rows included."""
    hidden, weight, b, labels = (t.cuda() for t in _case(n, v, d, dtype=dtype))
    labels[::5] = -100
    kw = dict(label_smoothing=0.1)
    truth = _loss_and_grads(_torch_loss, hidden.double(), weight.double(), b.double(), labels, **kw)
    low = _loss_and_grads(_torch_loss, hidden, weight, b, labels, **kw)
    with ckpt_ext.set_backend(backend):
        got = _loss_and_grads(_ours, hidden, weight, b, labels, chunk_bytes=6 * v * 64, **kw)
    assert_close_to_truth(got, low, truth, floor=ATOL.get(dtype))


@pytest.mark.triton
def test_triton_ops_without_bias_and_strided_weight():
    pytest.importorskip("triton")
    from ckpt_ext.backends.triton import lm_head as lce

    hidden, weight, _, labels = _case(20, 70, 8, bias=False)
    weight = weight.t().contiguous().t()
    lse_ref = reference.linear_cross_entropy_fwd(hidden, weight, None, labels, -100, 0.0, 8)
    got = lce.linear_cross_entropy_fwd(hidden, weight, None, labels, -100, 0.0, 8)
    for o, e in zip(got, lse_ref):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
    dloss = torch.randn(20)
    expected = reference.linear_cross_entropy_bwd(dloss, hidden, weight, None, labels, got[1], -100, 0.0, 8, False)
    out = lce.linear_cross_entropy_bwd(dloss, hidden, weight, None, labels, got[1], -100, 0.0, 8, False)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ Hugging Face
def _tiny_models():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    small = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=101, tie_word_embeddings=False)  # fmt: skip
    configs = (
        gpt2,
        transformers.LlamaConfig(**small),
        transformers.MistralConfig(**small),
        transformers.Qwen2Config(**small),
        transformers.Qwen3Config(**small, head_dim=8),
    )
    return [transformers.AutoModelForCausalLM.from_config(c, attn_implementation="eager") for c in configs]


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4], ids=["gpt2_tied", "llama", "mistral", "qwen2", "qwen3"])
def test_hf_patch_matches_the_original_loss_and_gradients(index):
    from ckpt_ext.integrations.hf_loss import patch_causal_lm_loss, unpatch_causal_lm_loss

    torch.manual_seed(0)
    ref = _tiny_models()[index].train()
    ours = patch_causal_lm_loss(copy.deepcopy(ref))
    if index == 0:
        assert ours.lm_head.weight is ours.transformer.wte.weight  # tied, as GPT-2 ships
    ids = torch.randint(0, 101, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100  # padding
    for kw in (dict(), dict(num_items_in_batch=torch.tensor(11))):
        a = ref(input_ids=ids, labels=labels, **kw)
        b = ours(input_ids=ids, labels=labels, **kw)
        assert b.logits is None and a.logits is not None
        torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=1e-6)
        names = [name for name, _ in ref.named_parameters()]
        grads_a = torch.autograd.grad(a.loss, list(ref.parameters()))
        grads_b = torch.autograd.grad(b.loss, list(ours.parameters()))
        for name, ga, gb in zip(names, grads_a, grads_b):
            torch.testing.assert_close(gb, ga, atol=1e-6, rtol=1e-5, msg=name)
    as_tuple = ours(input_ids=ids, labels=labels, return_dict=False)
    original_tuple = ref(input_ids=ids, labels=labels, return_dict=False)
    assert len(as_tuple) == len(original_tuple) - 1  # (loss, past_key_values, ...) without the logits
    torch.testing.assert_close(as_tuple[0], original_tuple[0], atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # no grad, eval, or no labels: the original head and its logits
        assert ours(input_ids=ids, labels=labels).logits.shape == (2, 9, 101)
    assert ours(input_ids=ids).logits.shape == (2, 9, 101)
    ours.eval()
    torch.testing.assert_close(ours(input_ids=ids, labels=labels).logits, ref.eval()(input_ids=ids).logits)
    unpatch_causal_lm_loss(ours.train())
    assert "forward" not in ours.__dict__ and ours(input_ids=ids, labels=labels).logits is not None


def test_hf_patch_falls_back_with_a_warning(caplog):
    from ckpt_ext.integrations.hf_loss import patch_causal_lm_loss

    torch.manual_seed(0)
    model = _tiny_models()[1].train()
    ids = torch.randint(0, 101, (2, 9))
    model.config.final_logit_softcapping = 30.0  # Gemma-style softcapping is not reproduced: original head
    patch_causal_lm_loss(model)
    with caplog.at_level("WARNING"):
        out = model(input_ids=ids, labels=ids)
        model(input_ids=ids, labels=ids)
    assert out.logits is not None
    assert sum("final_logit_softcapping" in r.getMessage() for r in caplog.records) == 1
    model.config.final_logit_softcapping = None
    model.lm_head = torch.nn.Sequential(model.lm_head)  # a wrapped head (as LoRA's): original head, warned
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert model(input_ids=ids, labels=ids).logits is not None
    assert any("not a plain nn.Linear" in r.getMessage() for r in caplog.records)


def test_hf_patch_refuses_unsupported_models():
    from ckpt_ext.integrations.hf_loss import patch_causal_lm_loss

    with pytest.raises(TypeError, match="supported model types"):
        patch_causal_lm_loss(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------- bench
def test_bench_head_quick(capsys):
    assert bench_head.main(["--quick", "--no-compile", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.strip().startswith("1000")]
    assert len(row) == 1, out
    fused_peak_ratio = float(row[0].split("|")[3].split("/")[0])
    if ckpt_ext.backend.concrete_backend("cpu") == "cpp":  # the reference backend materializes the logits itself
        assert 0.0 < fused_peak_ratio < 1.0, out  # at V=1000, N=256 the C++ kernel already holds less than hf


# ---------------------------------------------------------------------------------------------- sm_90 compile lane
_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ckpt_ext.kernels import compile_check
from ckpt_ext.kernels.linear_cross_entropy import compile_jobs
for job in compile_jobs(90):
    name, fn, sig, const, attrs, opts = compile_check._prepared(job)
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    usage = compile_check.resource_usage(compiled.asm["cubin"])
    dtype = next(v for v in sig.values() if v.startswith("*"))[1:]
    print(name, dtype, usage["regs"], usage["spills"], compiled.metadata.shared + usage["static_shared"])
"""


@pytest.mark.compile
def test_lm_head_kernels_compile_for_sm90_without_spills():
    """The forward and dz kernels in bf16, fp16 and fp32 (the same jobs compile_check runs), in a subprocess without
    TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert {(r[0], r[1]) for r in rows} == {(k, dt) for k in ("linear_cross_entropy_fwd", "linear_cross_entropy_dz")
                                            for dt in ("bf16", "fp16", "fp32")}  # fmt: skip
    for name, dtype, regs, spills, shared in rows:
        assert int(spills) == 0 and int(regs) <= 255 and int(shared) <= 232448, (name, dtype, regs, spills, shared)


def test_torch_compile_fullgraph():
    """The public function traces into one graph (the label-range check, which syncs, is skipped while compiling)."""
    hidden, weight, b, labels = _case(33, 97, 8)
    compiled = torch.compile(lambda h, w, bb, y: linear_cross_entropy(h, w, y, bias=bb, label_smoothing=0.1),
                             fullgraph=True, backend="aot_eager")  # fmt: skip
    expected = _loss_and_grads(_torch_loss, hidden, weight, b, labels, label_smoothing=0.1)
    got = _loss_and_grads(compiled, hidden, weight, b, labels)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
