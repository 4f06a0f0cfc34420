"""bench.block smoke tests at tiny sizes (no timed assertions): every row runs and prints; measured kept bytes equal
the policy table; the HF LlamaDecoderLayer gets the block's exact weights; the compile-budget anchor rows really get
their own partitioner budget (less kept at a lower budget) and compiled ckpt_ext rows keep what eager ones keep."""

import torch

from bench import block as bench_block

TINY = dict(d_model=24, n_heads=4, d_ff=40, batch=3, seq=5, min_time=0.0, min_rounds=2)


def _cell_ok(cell: str) -> bool:
    return cell == "noisy" or (cell.endswith("x") and float(cell[:-1]) > 0)


def test_llama_rows_without_compile(capsys):
    rows = bench_block.run("llama", n_kv_heads=2, budgets=(), compiled_policies=(), **TINY)
    by_name = {r["variant"]: r for r in rows}
    assert {"eager block", "HF LlamaDecoderLayer eager", "HF gradient checkpointing", "torch checkpoint"} <= set(
        by_name
    )
    for policy in bench_block.POLICIES:
        row = by_name[f"ckpt_ext {policy}"]
        assert row["kept"] == row["table"], policy
        assert row["flops"] >= 1.0
    assert by_name["ckpt_ext block"]["kept"] < 0.2 < by_name["torch SAC (save matmuls + attention)"]["kept"]
    assert by_name["HF LlamaDecoderLayer eager"]["flops"] == 1.0
    assert by_name["torch checkpoint"]["flops"] > 1.0
    for row in rows:
        assert set(row["ratios"]) == {"eager block", "torch checkpoint", "HF LlamaDecoderLayer eager",
                                      "HF gradient checkpointing"}  # fmt: skip
        assert all(_cell_ok(c) for c in row["ratios"].values())
    table = bench_block.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "× HF grad ckpt" in table and "GEMM ms" in table
    for row in rows:  # every variant runs matrix products, and they fit inside its step
        assert 0 < row["gemm_share"] <= 1 and 0 < row["gemm"] <= row["timing"].median * 1e3
    assert by_name["torch checkpoint"]["gemm"] > 0 and by_name["ckpt_ext block"]["gemm"] > 0
    floor = bench_block.floor_line(rows)
    assert floor.startswith("floor: block ≤ 0.9× torch checkpoint") and "the eager block's (no recompute)" in floor
    goals = bench_block.goal_table(rows, TINY["d_model"])
    assert "| torch checkpoint | 0.000 | block " in goals  # ckpt_ext block keeps ~0, checkpoint-based rows 0 (S)


def test_hf_layer_has_the_block_weights():
    blk = bench_block.make_block("llama", 24, 4, 2, 40)
    pe = bench_block.rope_tables(5, blk.head_dim)
    hf = bench_block.hf_llama_layer(blk)
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(bench_block._first(hf(x, position_embeddings=pe)), blk(x, position_embeddings=pe))


def test_compiled_rows_budgets_and_policies():
    torch._dynamo.reset()
    rows = bench_block.run("gpt2", budgets=(1.0, 0.0), compiled_policies=("block",), **TINY)
    by_name = {r["variant"]: r for r in rows}
    assert by_name["compile, memory budget 0.0"]["kept"] < by_name["compile, memory budget 1.0"]["kept"]
    assert by_name["compile, memory budget 1.0"]["flops"] is None
    eager, compiled = by_name["ckpt_ext block"]["kept"], by_name["ckpt_ext block compiled"]["kept"]
    assert eager <= compiled < eager + 0.01
