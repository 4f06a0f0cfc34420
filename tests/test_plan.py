"""The memory-budget planner: parsing, optimality of the search, the CLI, and predicted activation memory against
memory measured on CPU (retained_activation_bytes of TransformerBlock models with the planned policies, fp32)."""

import importlib
import itertools
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ckpt_ext import FusedCheckpointBlock, TransformerBlock, planner
from ckpt_ext.measure import retained_activation_bytes

RELATIVE_TIME = {"eager": 1.0, "none": 1.01, "pointwise": 1.015, "ffn": 1.04, "block": 1.2, "checkpoint": 1.33}


def stub_step_time(variant, d_model, seq, batch, n_heads, dtype=torch.bfloat16, mlp_ratio=4.0, activation="gelu"):
    return RELATIVE_TIME[variant] * d_model * seq * batch * 1e-12


@pytest.fixture
def stub_roofline(monkeypatch):
    monkeypatch.setattr(planner, "_load_step_time", lambda: stub_step_time)


@pytest.mark.parametrize(
    "text, expected",
    [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("512 MiB", 512 * 2**20), ("1.5G", 3 * 2**29), (4096, 4096)],
)
def test_parse_memory(text, expected):
    assert planner.parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["lots", "24XB", -1, True])
def test_parse_memory_rejects(bad):
    with pytest.raises((ValueError, TypeError)):
        planner.parse_memory(bad)


def test_plan_is_optimal_and_respects_budget(stub_roofline):
    shape = planner.make_shape(512, 3, 8, 512, 4, "bf16")
    full = planner.evaluate(shape, ["none"] * 3, 2**50).peak_bytes
    lean = planner.evaluate(shape, ["block"] * 3, 2**50).peak_bytes
    for budget in (full + 1, (full + lean) // 2, lean + 1, (lean + shape.state_bytes) // 2):
        got = planner.plan(512, 3, 8, 512, 4, budget)
        feasible = [planner.evaluate(shape, kinds, budget) for kinds in itertools.product(
            ("eager", "none", "pointwise", "ffn", "block"), repeat=3)]  # fmt: skip
        feasible = [p for p in feasible if p.fits]
        if not feasible:
            assert not got.fits and "cannot be met" in str(got)
            continue
        assert got.fits and got.peak_bytes <= budget
        assert got.overhead == pytest.approx(min(p.overhead for p in feasible), abs=1e-9)
    assert planner.plan(512, 3, 8, 512, 4, full + 1).policies == ("eager",) * 3  # stub: eager is fastest


def test_plan_accounts_model_state(stub_roofline):
    shape = planner.make_shape(1024, 24, 16, 1024, 32)
    assert shape.params_per_layer == 12 * 1024**2 + 13 * 1024
    assert shape.state_bytes == 16 * 24 * shape.params_per_layer
    tiny = planner.plan(1024, 24, 16, 1024, 32, "8GiB")
    assert not tiny.fits and "model state" in tiny.message


def test_callable_module_and_cli(stub_roofline, capsys):
    mod = importlib.import_module("ckpt_ext.plan")
    assert mod(256, 4, 4, 128, 2, "1GiB").fits
    assert mod.main(["--d-model", "1024", "--layers", "24", "--heads", "16", "--seq", "1024", "--batch", "32",
                     "--gpu-memory", "24GiB"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    rows = ("no checkpointing", "every 4th layer", "every 2nd layer", "block-level", "policy=ffn", "recommendation")
    assert all(row in out for row in rows), out


def test_cli_runs_with_the_real_roofline():
    pytest.importorskip("ckpt_ext.roofline")
    args = ["--d-model", "256", "--layers", "4", "--heads", "4", "--seq", "256", "--batch", "2", "--gpu-memory", "1GiB"]
    out = subprocess.run([sys.executable, "-m", "ckpt_ext.plan", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "recommendation" in out.stdout


class _TorchCheckpoint(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def _model(kinds, d, h):
    layers = []
    for kind in kinds:
        block = TransformerBlock(d, h)
        if kind == "checkpoint":
            layers.append(_TorchCheckpoint(block))
        elif kind == "eager":
            layers.append(block)
        else:
            layers.append(FusedCheckpointBlock.from_block(block, policy=kind))
    return nn.Sequential(*layers)


def test_predicted_activation_memory_matches_cpu(stub_roofline):
    d, h, n_layers, seq, batch = 64, 4, 4, 64, 2
    shape = planner.make_shape(d, n_layers, h, seq, batch, "fp32")
    lean, full = (planner.evaluate(shape, [k] * n_layers, 2**50).peak_bytes for k in ("block", "none"))
    plans = [planner.plan(d, n_layers, h, seq, batch, b, "fp32").policies for b in (full, (lean + full) // 2, lean)]
    plans += [kinds for _, kinds in planner.strategies(shape)]
    assert len({p for p in plans}) >= 8
    x0 = torch.randn(batch, seq, d, requires_grad=True)
    for kinds in plans:
        model = _model(kinds, d, h)
        measured, _ = retained_activation_bytes(lambda m=model: m(x0 * 1.0))  # the first input is an activation too
        predicted = planner.evaluate(shape, kinds, 2**50).activation_bytes
        assert abs(measured - predicted) <= 0.1 * measured, (kinds, measured, predicted)
