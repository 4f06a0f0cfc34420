"""``python -m bench.cpu`` at a tiny size: every part runs and prints its table (timings are not checked)."""

from __future__ import annotations

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
    assert "bf16 autocast" in out and "dropout=0.0 fp32" in out


def test_op_parts_print_every_op(capsys):
    cpu.bench_ops(sizes=((4, 40),))
    cpu.bench_ffn_ops(n=4, d=16, h=64)
    out = capsys.readouterr().out
    for name in ("layer_norm fwd", "layer_norm bwd", "gelu bwd (erf)", "bias+gelu (erf)", "dropout+add",
                 "ffn_recompute", "linear_bias_gelu", "linear_gelu_bwd", "gelu_linear_wgrad"):  # fmt: skip
        assert out.count(name) == 2, name  # fp32 and bf16
