"""``python -m bench.cpu`` at a tiny size: every part runs and prints its table (timings are not checked); the
benchmarks' malloc tuning really stops page faults on re-allocation."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from bench import cpu

TINY = ["--batch", "1", "--seq", "8", "--d-model", "32", "--heads", "2", "--min-time", "0.001", "--threads", "1"]


def test_block_part_prints_every_policy_and_the_ceiling(capsys):
    cpu.main([*TINY, "--part", "block"])
    out = capsys.readouterr().out
    assert "C++ kernels on 1)" in out
    assert out.count("torch.utils.checkpoint (non-reent.)") == len(cpu.BLOCK_CONFIGS)
    for policy in ("none", "pointwise", "ffn", "block"):
        assert out.count(f"cpp policy={policy} ") == len(cpu.BLOCK_CONFIGS)
    assert out.count("block ceiling") == len(cpu.BLOCK_CONFIGS)
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
