"""``python -m bench.cpu`` at a tiny size: every part runs and prints its table (timings are not checked); the
round-robin timer and the "noisy" rule on a simulated clock; the benchmarks' malloc tuning really stops page faults on
re-allocation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bench import cpu
from bench.micro_timing import ratio, ratio_text, spread_text, summarize, time_interleaved

TINY = ["--batch", "1", "--seq", "8", "--d-model", "32", "--heads", "2", "--min-time", "0.001", "--threads", "1"]


def test_block_part_prints_every_policy_and_the_ceiling(capsys):
    cpu.main([*TINY, "--part", "block"])
    out = capsys.readouterr().out
    assert "C++ kernels on 1)" in out
    assert out.count("torch.utils.checkpoint (non-reent.)") == len(cpu.BLOCK_CONFIGS)
    for policy in ("none", "pointwise", "ffn", "block"):
        assert out.count(f"cpp policy={policy} ") == len(cpu.BLOCK_CONFIGS)
    assert out.count("block ceiling") == len(cpu.BLOCK_CONFIGS)
    rows = [line for line in out.splitlines() if line.startswith(("TransformerBlock", "cpp policy=", "block ceiling"))]
    for line in rows:  # "median [q25-q75]" then two ratio cells, each "1.23x" or "noisy"
        cells = line.split()
        assert "[" in line and all(c == "noisy" or (c.endswith("x") and float(c[:-1]) > 0) for c in cells[-2:]), line
    assert "bf16 autocast" in out and "dropout=0.0 attn_dropout=0.0 fp32" in out and "attn_dropout=0.1" in out


def test_main_restores_threads_and_timing(capsys):
    before = (cpu.MIN_RUN_S, torch.get_num_threads())
    cpu.main([*TINY, "--part", "ffn", "--threads", str(before[1] + 1)])
    assert (cpu.MIN_RUN_S, torch.get_num_threads()) == before


def test_op_parts_print_every_op(capsys, monkeypatch):
    monkeypatch.setattr(cpu, "MIN_RUN_S", 0.001)
    cpu.bench_ops(sizes=((4, 40),))
    cpu.bench_ffn_ops(n=4, d=16, h=64)
    out = capsys.readouterr().out
    for name in ("layer_norm fwd", "layer_norm bwd", "gelu bwd (erf)", "bias+gelu (erf)", "dropout+add",
                 "ffn_recompute", "linear_bias_gelu", "linear_gelu_bwd", "gelu_linear_wgrad"):  # fmt: skip
        assert out.count(name) == 2, name  # fp32 and bf16


class SimulatedMachine:
    """A clock that advances only when a variant runs: variant cost x a load factor that changes every few calls,
    as another job on a shared machine would."""

    def __init__(self, costs: dict, loads: list):
        self.now, self.calls, self.costs, self.loads = 0.0, [], costs, loads

    def clock(self) -> float:
        return self.now

    def variant(self, name):
        def run():
            self.now += self.costs[name] * self.loads[(len(self.calls) // 3) % len(self.loads)]
            self.calls.append(name)

        return run


def test_interleaved_rounds_rotate_and_pair_samples():
    m = SimulatedMachine({"a": 1.0, "b": 2.0, "c": 3.0}, loads=[1.0, 4.0, 1.5, 9.0])
    times = time_interleaved({k: m.variant(k) for k in "abc"}, min_time=0.0, min_rounds=6, warmup=0, sample_s=0.0,
                             clock=m.clock)  # fmt: skip
    rounds = [m.calls[i : i + 3] for i in range(3, len(m.calls), 3)]  # after the one calibration call each
    assert rounds[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert all(len(t.samples) == 6 for t in times.values())
    # The load swings each variant's time by 9x, but every round ran under one load: the paired ratio is exact.
    assert ratio_text(times["b"], times["a"]) == "2.00x" and ratio(times["c"], times["a"])[1:] == (3.0, 3.0)
    lo, hi = times["a"].iqr
    assert hi / lo > 2  # the unpaired spread is wide


@pytest.mark.parametrize(
    "num, den, expected",
    [
        ([2.0, 2.1, 1.9, 2.0, 2.2], [1.0, 1.0, 1.0, 1.0, 1.0], "2.00x"),
        ([1.02, 0.9, 1.1, 1.0, 0.95], [1.0, 1.0, 1.0, 1.0, 1.0], "noisy"),  # 2% apart, 10% spread
        ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], "1.00x"),
        ([0.5, 0.52, 0.49], [1.0, 1.0, 1.0], "0.50x"),
    ],
)
def test_ratio_printed_only_when_spread_is_below_the_difference(num, den, expected):
    assert ratio_text(summarize(num), summarize(den)) == expected


def test_spread_text_is_median_and_iqr():
    assert spread_text(summarize([1e-3, 2e-3, 3e-3, 4e-3, 5e-3])) == "3.000 [2.000-4.000]"


FAULTS_SCRIPT = """
import resource, sys, torch
from bench import cpu, malloc_tuning
from ckpt_ext import FusedCheckpointBlock, TransformerBlock
if sys.argv[1] == "1":
    assert malloc_tuning.keep_freed_memory()
torch.set_num_threads(2)
blk, x = TransformerBlock(256, 4), torch.randn(8, 256, 256)
steps = [cpu._step(blk, x, amp=True), cpu._step(blk, x, amp=True, use_checkpoint=True),
         cpu._step(FusedCheckpointBlock.from_block(blk, "block"), x, amp=True)]
for _ in range(2):
    for step in steps:
        step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    for step in steps:
        step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 9)
"""


def test_malloc_tuning_stops_per_step_page_faults():
    """bench.cpu's pattern in a fresh process: bf16 steps of eager, torch checkpoint and the fused block, interleaved.
    Tuned, a step takes at most a few hundred page faults (seen: 29-307); untuned glibc served the shifting multi-MB
    blocks with fresh mmaps (seen: 2,000-3,400 per step here, up to ~7,000 in bench.cpu). Both are printed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def faults(tuned: bool) -> float:
        cmd = [sys.executable, "-c", FAULTS_SCRIPT, "1" if tuned else "0"]
        return float(subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout.split()[-1])

    tuned, untuned = faults(True), faults(False)
    print(f"page faults per step: tuned {tuned:.0f}, untuned {untuned:.0f}")
    assert tuned < 1000
