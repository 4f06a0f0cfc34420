"""Public API: constructor/forward errors, parameter sharing, state_dict round trips, apply_checkpointing, backends,
and the import-time promise (no triton import, no CUDA initialization)."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import ckpt_ext
from ckpt_ext import FusedCheckpointBlock, TransformerBlock, apply_checkpointing, set_backend

from helpers import assert_within_torch_error, make_block, run_step


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(d_model=72, n_heads=5), ValueError, "divide"),
        (dict(d_model=72, n_heads=4, activation="relu"), ValueError, "activation"),
        (dict(d_model=72, n_heads=4, dropout=1.0), ValueError, "dropout"),
        (dict(d_model=72, n_heads=4, policy="all"), ValueError, "policy"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FusedCheckpointBlock(**kwargs)


@pytest.mark.parametrize("cls", [TransformerBlock, FusedCheckpointBlock])
def test_forward_input_errors(cls):
    blk = cls(72, 4)
    with pytest.raises(ValueError, match=r"\(batch, seq, 72\)"):
        blk(torch.randn(4, 72))
    with pytest.raises(ValueError, match=r"\(batch, seq, 72\)"):
        blk(torch.randn(2, 3, 64))
    with pytest.raises(TypeError, match="floating"):
        blk(torch.ones(2, 3, 72, dtype=torch.long))


def test_from_block_shares_parameters():
    blk = make_block(72, 4)
    fused = FusedCheckpointBlock.from_block(blk, policy="ffn")
    assert all(a is b for a, b in zip(blk.parameters(), fused.parameters()))
    assert [n for n, _ in blk.named_parameters()] == [n for n, _ in fused.named_parameters()]
    x, g = torch.randn(2, 5, 72), torch.randn(2, 5, 72)
    fused(x).backward(g)
    assert blk.attn.qkv.weight.grad is not None  # gradients land on the shared parameters
    with pytest.raises(TypeError):
        FusedCheckpointBlock.from_block(nn.Linear(3, 3))


def test_state_dict_round_trip():
    blk = make_block(72, 4)
    fused = FusedCheckpointBlock(72, 4, policy="block")
    fused.load_state_dict(blk.state_dict())
    back = TransformerBlock(72, 4)
    back.load_state_dict(fused.state_dict())
    x = torch.randn(2, 7, 72)
    torch.testing.assert_close(fused(x), blk(x))
    torch.testing.assert_close(back(x), blk(x))


def test_eval_mode_disables_dropout():
    blk = make_block(72, 4, dropout=0.5, attn_dropout=0.5).eval()
    fused = FusedCheckpointBlock.from_block(blk, "block")
    x = torch.randn(2, 7, 72)
    torch.testing.assert_close(fused(x), blk(x))


class TinyModel(nn.Module):
    def __init__(self, n_layers=8):
        super().__init__()
        self.blocks = nn.ModuleList([make_block(72, 4, seed=i) for i in range(n_layers)])
        self.head = nn.Linear(72, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize("every, expected", [(1, 8), (2, 4), (4, 2), (3, 2)])
def test_apply_checkpointing(every, expected):
    model = TinyModel()
    x, g = torch.randn(2, 5, 72), torch.randn(2, 5, 3)
    ref = run_step(model, x, g)
    ref64 = [t.double() for t in run_step(copy.deepcopy(model).double(), x.double(), g.double())]
    before = dict(model.named_parameters())
    assert apply_checkpointing(model, policy="block", every=every) == expected
    fused = [i for i, b in enumerate(model.blocks) if isinstance(b, FusedCheckpointBlock)]
    assert fused == [i for i in range(8) if (i + 1) % every == 0]
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    # 8 stacked blocks in fp32: held to the tolerance rule against float64, like the single-block parity tests.
    assert_within_torch_error(run_step(model, x, g), ref, ref64, atol=1e-6)
    with pytest.raises(ValueError):
        apply_checkpointing(model, every=0)


class NestedModel(nn.Module):
    """Blocks registered as first, stack.0, stack.1, last (module order) by two different parents."""

    def __init__(self):
        super().__init__()
        self.first = make_block(72, 4, seed=0)
        self.stack = nn.ModuleList([make_block(72, 4, seed=1), make_block(72, 4, seed=2)])
        self.last = make_block(72, 4, seed=3)

    def forward(self, x):
        for b in (self.first, *self.stack, self.last):
            x = b(x)
        return x


def fused_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, FusedCheckpointBlock)]


def test_apply_checkpointing_counts_blocks_in_module_order():
    """Issue 15 item 6: every=2 used to count parent by parent (first, last, stack.0, stack.1) and convert
    stack.1 and last; module order converts stack.0 and last."""
    model = NestedModel()
    x, g = torch.randn(3, 7, 72), torch.randn(3, 7, 72)
    ref = run_step(model, x, g)
    ref64 = [t.double() for t in run_step(copy.deepcopy(model).double(), x.double(), g.double())]
    assert apply_checkpointing(model, policy="pointwise", every=2) == 2
    assert fused_names(model) == ["stack.0", "last"]
    assert_within_torch_error(run_step(model, x, g), ref, ref64, atol=1e-6)
    assert apply_checkpointing(model, policy="block", every=3) == 1
    assert fused_names(model) == ["stack.0", "stack.1", "last"]
    assert [model.stack[0].policy, model.stack[1].policy] == ["pointwise", "block"]


def test_apply_checkpointing_shared_block_counts_once():
    shared = make_block(72, 4)
    model = nn.ModuleDict({"a": shared, "b": make_block(72, 4, seed=1), "c": shared})
    assert apply_checkpointing(model, every=1) == 2
    assert model["a"] is model["c"] and isinstance(model["a"], FusedCheckpointBlock)
    assert model["a"].ln_1.weight is shared.ln_1.weight


@pytest.mark.parametrize(
    "model, kwargs, exc, match",
    [
        (nn.Sequential(nn.Linear(4, 4)), {}, TypeError, "no ckpt_ext.TransformerBlock"),
        (nn.Module(), {}, TypeError, "no ckpt_ext.TransformerBlock"),
        ("not a module", {}, TypeError, "model"),
        (TransformerBlock(72, 4), {}, TypeError, "model.*from_block"),
        (TinyModel(2), dict(every=True), ValueError, "every"),
        (TinyModel(2), dict(every=2.0), ValueError, "every"),
        (TinyModel(2), dict(every=-1), ValueError, "every"),
        (TinyModel(2), dict(policy="all"), ValueError, "policy"),
    ],
)
def test_apply_checkpointing_errors_like_apply_fused_checkpointing(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        apply_checkpointing(model, **kwargs)


def test_set_backend_call_context_and_errors(monkeypatch):
    assert ckpt_ext.get_backend() in ckpt_ext.backend.BACKENDS
    with set_backend("reference"):
        assert ckpt_ext.get_backend() == "reference"
        with set_backend("cpp"):
            assert ckpt_ext.get_backend() == "cpp"
        assert ckpt_ext.get_backend() == "reference"
    set_backend("reference")
    assert ckpt_ext.get_backend() == "reference"
    set_backend("auto")
    with pytest.raises(ValueError, match="unknown ckpt_ext backend"):
        set_backend("tpu")
    from ckpt_ext.backends import cpp, triton

    monkeypatch.setattr(triton, "installed", lambda: False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        set_backend("triton")
    monkeypatch.setattr(cpp, "built", lambda: False)
    with pytest.raises(RuntimeError, match="ckpt_ext._C"):
        set_backend("cpp")


def test_cuda_backend_reports_cpu_only_build():
    if ckpt_ext.backend.cuda_ext_available():
        pytest.skip("extension built with CUDA kernels")
    with pytest.raises(RuntimeError, match="CPU-only"):
        set_backend("cuda")


def test_backend_env_variable():
    code = "import ckpt_ext; print(ckpt_ext.get_backend())"
    env = dict(os.environ, CKPT_EXT_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["CKPT_EXT_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code + "; ckpt_ext.FusedCheckpointBlock(8, 2)(__import__('torch')"
                          ".randn(1, 2, 8))"], env=env, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "unknown ckpt_ext backend" in bad.stderr


def test_import_does_not_load_triton_or_cuda():
    """`import ckpt_ext` imports no triton; running the block never initializes CUDA. (Running any custom op makes torch
    import torch._dynamo, which itself imports triton when installed: that is torch's doing, not ours.)"""
    code = (
        "import sys, torch, ckpt_ext; assert 'triton' not in sys.modules, 'triton imported';"
        "m = ckpt_ext.FusedCheckpointBlock(8, 2); m(torch.randn(1, 3, 8)).sum().backward();"
        "assert 'ckpt_ext.kernels' not in sys.modules, 'Triton kernels imported';"
        "assert not torch.cuda.is_initialized(), 'CUDA initialized'"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_import_without_triton_installed():
    """A blocker on the meta path makes `import triton` fail, as on a machine without it."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'): raise ImportError('no triton')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, ckpt_ext\n"
        "assert not ckpt_ext.backend.triton_available()\n"
        "ckpt_ext.FusedCheckpointBlock(8, 2, policy='ffn')(torch.randn(1, 3, 8)).sum().backward()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
