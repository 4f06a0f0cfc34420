"""Traced programs (ckpt_ext/traced.py, op_program.py, csrc/program.cpp): bitwise the walked fast path, the same saved
set, used only where eligible, keyed by everything a graph freezes."""

from __future__ import annotations

import operator

import pytest
import torch
from test_llama_block import rope_tables
from torch.fx.experimental.proxy_tensor import make_fx

import ckpt_ext
from ckpt_ext import FusedCheckpointBlock, op_program, traced
from ckpt_ext.block import init_block_

from helpers import run_step

pytestmark = pytest.mark.skipif(not op_program.available(), reason="ckpt_ext._C is not built")

POLICIES = ("none", "pointwise", "ffn", "block_keep_attn", "block")
FORMS = {
    "gpt2": dict(),
    "gpt2_nobias": dict(bias=False),
    "llama_gqa": dict(activation="swiglu", n_kv_heads=2, d_ff=40),
    "llama_mha_qkbias": dict(activation="swiglu", d_ff=24, qkv_bias=True),
    "qwen3": dict(activation="swiglu", n_kv_heads=1, d_ff=40, qk_norm=True, head_dim=8),
}


def _block(form: str, policy: str, dtype=torch.float32) -> FusedCheckpointBlock:
    torch.manual_seed(0)
    blk = FusedCheckpointBlock(24, 4, policy=policy, **FORMS[form])
    init_block_(blk, std=0.3)
    return blk.to(dtype)


def _kwargs(blk, t: int, dtype):
    if not blk.llama:
        return {}
    return {"position_embeddings": rope_tables(1, t, blk.head_dim or blk.d_model // blk.n_heads, dtype)}


@pytest.fixture(autouse=True)
def _fresh_programs():
    traced.clear()
    traced.set_enabled(True)
    yield
    traced.set_enabled(True)
    traced.clear()


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("b,t", [(1, 1), (3, 7)])
def test_traced_equals_walked_bitwise(form, policy, dtype, b, t):
    blk = _block(form, policy, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, t, 24, generator=gen).to(dtype)
    grad = torch.randn(b, t, 24, generator=gen).to(dtype)
    kw = _kwargs(blk, t, dtype)
    x2, grad2 = torch.randn(b, t, 24, generator=gen).to(dtype), torch.randn(b, t, 24, generator=gen).to(dtype)
    names = ["out", "dx"] + [n for n, _ in blk.named_parameters()]
    with ckpt_ext.set_backend("cpp"):
        run_step(blk, x, grad, **kw)  # a new key: walked, counted
        first = run_step(blk, x, grad, **kw)  # traces
        (program,) = [p for p in traced._programs.values()]
        assert isinstance(program.run, op_program.OpProgram)
        (bwd,) = program.backward_programs.values()
        assert isinstance(bwd.run, op_program.OpProgram)
        originals = [p.detach().clone() for p in blk.parameters()]
        with torch.no_grad():  # the programs take their inputs: new x, dout and parameter values
            for p in blk.parameters():
                p.mul_(1.5)
        again = run_step(blk, x2, grad2, **kw)  # runs the programs
        traced.set_enabled(False)
        walked_again = run_step(blk, x2, grad2, **kw)
        with torch.no_grad():
            for p, original in zip(blk.parameters(), originals):
                p.copy_(original)
        walked = run_step(blk, x, grad, **kw)
    for name, a, w in zip(names, first, walked):
        assert torch.equal(a, w), name
    for name, c, w in zip(names, again, walked_again):
        assert torch.equal(c, w), name


def _saved_bytes(blk, x, **kw) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        blk(x, **kw)
    return total[0]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("form", ["gpt2", "qwen3"])
def test_traced_saves_the_policys_set(form, policy):
    blk = _block(form, policy)
    x = torch.randn(2, 5, 24, requires_grad=True)
    kw = _kwargs(blk, 5, torch.float32)
    with ckpt_ext.set_backend("cpp"):
        for _ in range(traced.TRACE_AFTER):
            traced_bytes = _saved_bytes(blk, x, **kw)
        assert traced._programs
        traced.set_enabled(False)
        walked_bytes = _saved_bytes(blk, x, **kw)
    assert traced_bytes == walked_bytes


def test_ineligible_calls_walk_the_fast_path():
    blk = _block("gpt2", "block")
    x = torch.randn(2, 5, 24, requires_grad=True)
    drop = _block("gpt2", "block")
    drop.dropout = 0.1
    for _ in range(3):
        with ckpt_ext.set_backend("cpp"):
            blk(x, attn_mask=torch.ones(5, 5, dtype=torch.bool)).sum().backward()
            blk(x, segment_ids=torch.ones(2, 5, dtype=torch.int64)).sum().backward()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                blk(x).float().sum().backward()
            drop.train()(x).sum().backward()
        with ckpt_ext.set_backend("reference"):
            blk(x).sum().backward()
    assert not traced._programs and not traced._seen
    traced.set_enabled(False)
    with ckpt_ext.set_backend("cpp"):
        for _ in range(3):
            blk(x).sum().backward()
    assert not traced._programs and not traced._seen


def test_a_key_is_traced_on_its_second_call():
    blk = _block("gpt2", "none")
    with ckpt_ext.set_backend("cpp"):
        blk(torch.randn(1, 3, 24, requires_grad=True)).sum().backward()
        assert not traced._programs and len(traced._seen) == 1
        blk(torch.randn(1, 3, 24, requires_grad=True)).sum().backward()
        assert len(traced._programs) == 1 and not traced._seen
        blk(torch.randn(1, 4, 24, requires_grad=True)).sum().backward()  # a one-off shape: counted, not traced
        assert len(traced._programs) == 1 and len(traced._seen) == 1


def test_keys_cover_shapes_strides_and_dout_layout():
    blk = _block("gpt2", "ffn")
    with ckpt_ext.set_backend("cpp"):
        blk(torch.randn(2, 5, 24, requires_grad=True)).sum().backward()  # counted
        blk(torch.randn(2, 5, 24, requires_grad=True)).sum().backward()  # dout: expanded (strides 0)
        blk(torch.randn(2, 5, 24, requires_grad=True)).backward(torch.randn(2, 5, 24))  # contiguous dout
        assert len(traced._programs) == 1
        (program,) = traced._programs.values()
        assert len(program.backward_programs) == 2
        for _ in range(2):
            blk(torch.randn(1, 6, 24, requires_grad=True)).sum().backward()
        assert len(traced._programs) == 2
        with torch.no_grad():  # a strided weight (e.g. a transposed view) is another key, and still exact
            w = blk.mlp.fc.weight
            blk.mlp.fc.weight = torch.nn.Parameter(w.detach().t().contiguous().t())
        x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
        run_step(blk, x, g)
        traced_run = run_step(blk, x, g)
        assert len(traced._programs) == 3
        traced.set_enabled(False)
        assert all(torch.equal(a, b) for a, b in zip(traced_run, run_step(blk, x, g)))


def _graph():
    def fn(a, b, w):
        ab = torch.cat((a, b), dim=1)  # (4, 6)
        left, right = ab.split_with_sizes([2, 4], 1)
        y = torch.addmm(right.sum(dim=1, keepdim=True), left, w, alpha=0.5)
        return y.clone(memory_format=torch.contiguous_format).to(torch.float64), ab.transpose(0, 1)

    args = (torch.randn(4, 3), torch.randn(4, 3), torch.randn(2, 5))
    return make_fx(fn)(*args), args


def test_op_program_matches_the_graph():
    gm, args = _graph()
    program = op_program.OpProgram(gm)
    for got, want in zip(program(*args), gm(*args)):
        assert torch.equal(got, want) and got.stride() == want.stride() and got.dtype == want.dtype


def test_op_program_releases_temporaries_at_their_last_use():
    gm, _ = _graph()
    ops, code, _, _ = op_program.encode(gm)
    n_slots, n_inputs, n_out = code[:3]
    outputs = code[3 : 3 + n_out]
    assert n_inputs == 3 and len(set(outputs)) == 2
    freed = []
    pos = 3 + n_out + 1
    for _ in range(code[3 + n_out]):  # walk the instructions as csrc/program.cpp reads them
        pos += 1
        n_args = code[pos]
        pos += 1
        for _ in range(n_args):
            kind = code[pos]
            pos += 1
            if kind in (op_program.SLOT, op_program.INT, op_program.FLOAT, op_program.BOOL, op_program.STR,
                        op_program.DEVICE):  # fmt: skip
                pos += 1
            elif kind in (op_program.INTS, op_program.SLOTS):
                pos += 1 + code[pos]
        pos += 1 + code[pos]
        pos += 1
        n_free = code[pos]
        freed += code[pos + 1 : pos + 1 + n_free]
        pos += 1 + n_free
    assert pos == len(code)
    assert not set(freed) & set(outputs)  # outputs stay
    assert len(freed) == len(set(freed))  # each slot released once
    assert set(freed) | set(outputs) | set(range(n_inputs)) == set(range(n_slots))  # every temporary released


def test_op_program_refuses_what_it_cannot_express():
    gm = torch.fx.symbolic_trace(lambda x: x.relu())  # a call_method node
    with pytest.raises(op_program.Unsupported, match="call_method"):
        op_program.OpProgram(gm)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(operator.add, (x, x)))
    with pytest.raises(op_program.Unsupported):
        op_program.OpProgram(torch.fx.GraphModule({}, graph))


def test_program_run_checks_its_arguments():
    gm, args = _graph()
    program = op_program.OpProgram(gm)
    with pytest.raises(RuntimeError, match="takes 3 inputs, got 2"):
        program(*args[:2])
    with pytest.raises(RuntimeError, match="no program"):
        torch.ops.ckpt_ext.program_run.default(-1, list(args))
    with pytest.raises(RuntimeError, match="code ends early"):
        torch.ops.ckpt_ext.program_build.default(["aten::add.Tensor"], [3, 1], [], [])


@pytest.mark.parametrize("form", ["gpt2", "qwen3"])
def test_saved_tensor_hooks_that_change_strides(form):
    """A saved_tensors_hooks pair may unpack tensors with other strides than the forward traced (here: column-major
    copies): the backward program is keyed by the unpacked layout, and the result is still the walked path's."""
    blk = _block(form, "pointwise")
    x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    kw = _kwargs(blk, 5, torch.float32)

    def pack(t):
        return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() >= 2 else t.clone()

    def run():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return run_step(blk, x, g, **kw)

    with ckpt_ext.set_backend("cpp"):
        for _ in range(3):
            got = run()
        (program,) = traced._programs.values()
        assert all(p is not None for p in program.backward_programs.values())
        traced.set_enabled(False)
        want = run()
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_op_program_takes_python_numbers_in_tensor_arguments():
    """x * 0.5 traces as aten::mul.Tensor(x, 0.5): the number becomes a wrapped-number tensor, so type promotion keeps
    x's dtype as Python's own call does."""

    def fn(x, i):
        return x * 0.5, x + 1, torch.rsub(x, 2.0), i * 3, x.to(torch.bfloat16) * 0.1

    args = (torch.randn(3, 4), torch.arange(4, dtype=torch.int32))
    gm = make_fx(fn)(*args)
    program = op_program.OpProgram(gm)
    for got, want in zip(program(*args), gm(*args)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_the_tiled_attention_route_traces(monkeypatch):
    """The tiled math attention (the CUDA route for fp32, h != hk, ...; forced here on CPU) scales scores by a Python
    float: traced, verified against its graph, bitwise the walked path."""
    from ckpt_ext.backends import aten_attention as native_attention

    monkeypatch.setattr(native_attention, "_route_gqa", lambda *a, **k: "cpu_math")
    blk = _block("llama_gqa", "block")
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(2, 7, 24, generator=gen), torch.randn(2, 7, 24, generator=gen)
    kw = _kwargs(blk, 7, torch.float32)
    with ckpt_ext.set_backend("cpp"):
        for _ in range(3):
            got = run_step(blk, x, g, **kw)
        (program,) = traced._programs.values()
        assert isinstance(program.run, op_program.OpProgram)
        traced.set_enabled(False)
        want = run_step(blk, x, g, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_backward_runs_on_the_forwards_backend():
    """A backward called under another backend (on CUDA autograd runs it on its own thread, where the thread-local
    backend is the default) runs the forward's: its traced program, equal to the walked path."""
    blk = _block("gpt2", "ffn")
    x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 24)

    def step(backward_backend):
        xr = x.clone().requires_grad_(True)
        blk.zero_grad(set_to_none=True)
        with ckpt_ext.set_backend("cpp"):
            out = blk(xr)
        with ckpt_ext.set_backend(backward_backend):
            out.backward(g)
        return [xr.grad] + [p.grad for p in blk.parameters()]

    for _ in range(3):
        got = step("reference")
    (program,) = traced._programs.values()
    assert all(p is not None for p in program.backward_programs.values())
    traced.set_enabled(False)
    want = step("cpp")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_program_that_disagrees_with_its_graph_is_not_used(monkeypatch):
    """_trace verifies the C++ program against the traced graph once; on a mismatch the graph's Python code runs."""
    real = op_program.OpProgram.__call__
    monkeypatch.setattr(op_program.OpProgram, "__call__", lambda self, *a: [t + 1 for t in real(self, *a)])
    blk = _block("gpt2", "none")
    x, g = torch.randn(1, 4, 24), torch.randn(1, 4, 24)
    with ckpt_ext.set_backend("cpp"), pytest.warns(UserWarning, match="differs from the traced graph"):
        for _ in range(3):
            got = run_step(blk, x, g)
    (program,) = traced._programs.values()
    assert isinstance(program.run, torch.fx.GraphModule)
    traced.set_enabled(False)
    with ckpt_ext.set_backend("cpp"):
        want = run_step(blk, x, g)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_tensor_subclasses_walk():
    class Tagged(torch.Tensor):
        pass

    blk = _block("gpt2", "none")
    x = torch.randn(1, 4, 24).as_subclass(Tagged).requires_grad_(True)
    with ckpt_ext.set_backend("cpp"):
        for _ in range(3):
            blk(x).sum().backward()
    assert not traced._programs and not traced._seen
