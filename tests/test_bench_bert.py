"""BERT in the benchmarks (issue 24): the roofline's transformers-BertLayer rows (ckpt_ext.roofline layer="hf_bert",
bench.roofline --family bert) and the post-LN TransformerBlock form (placement="post", causal=False)."""

from __future__ import annotations

import pytest
import torch
import transformers  # noqa: E402, F401  (make test installs it: missing, this file fails)

from ckpt_ext import roofline
from ckpt_ext.policies import POLICIES, retained_bytes

D, T, B, H, FF = 64, 32, 2, 4, 256


@pytest.mark.parametrize("policy", list(POLICIES))
def test_hf_bert_policies_keep_the_post_ln_table(policy):
    """The converted BertLayer runs fused under the trace (its kept bytes are the post-LN table's, in bf16), not the
    original forward (which keeps what eager keeps)."""
    kw = dict(d_ff=FF, layer="hf_bert")
    kept = roofline.retained_memory(policy, D, T, B, H, **kw)
    assert kept == retained_bytes(policy, B, T, D, H, FF, act_bytes=2, matmul_bytes=2, placement="post")
    if policy != "none":
        assert kept < roofline.retained_memory("eager", D, T, B, H, **kw)


def test_bert_roofline_rows_and_target():
    from bench import roofline as bench_roofline

    shapes = (("tiny", D, T, B, H, FF),)
    table = bench_roofline.bert_rows(shapes, dropout=0.1)
    by = {r["variant"]: r[0] for r in table}
    assert set(by) == set(roofline.VARIANTS)
    assert by["eager"]["vs_eager"] == 0.0 and by["checkpoint_reentrant"]["vs_hf_ckpt"] == 0.0
    assert by["checkpoint_reentrant"]["hf_ckpt_overhead"] > 0.1  # re-runs the layer's forward
    assert by["block"]["retained"] < by["ffn"]["retained"] < by["pointwise"]["retained"] < by["eager"]["retained"]
    md = bench_roofline.bert_markdown(table, shapes)
    assert md.count("\n") == len(table) + 1 and "HF BertLayer eager (sdpa)" in md
    verdict = bench_roofline.bert_targets(table, shapes)
    assert verdict.startswith("tiny block:") and ("met" in verdict) == (by["block"]["vs_eager"] <= 0.10)


def test_post_ln_block_shape_prices_the_post_table():
    kw = dict(placement="post", causal=False, dtype=torch.float32)
    for policy in POLICIES:
        assert roofline.retained_memory(policy, D, T, B, H, **kw) == retained_bytes(
            policy,
            B,
            T,
            D,
            H,
            4 * D,
            placement="post",
            ln2_from_out=True,  # fp32: x̂2 rebuilt from the output
        )
        measured = roofline.retained_memory(policy, D, T, B, H, measured=True, **kw)
        assert measured == roofline.retained_memory(policy, D, T, B, H, **kw), policy
    with pytest.raises(ValueError, match="lora"):
        roofline.step_time("eager", D, T, B, H, layer="hf_bert", lora=4)


TINY_BLOCK = dict(d_model=24, n_heads=4, d_ff=40, batch=3, seq=5, min_time=0.0, min_rounds=2)


def test_hf_bert_layer_has_the_block_weights():
    from bench import block as bench_block

    blk = bench_block.make_block("bert", 24, 4, None, 40)
    assert blk.norm_placement == "post" and not blk.causal
    hf = bench_block.hf_bert_layer(blk)
    x = torch.randn(2, 5, 24, requires_grad=True)
    torch.testing.assert_close(bench_block._first(hf(x)), blk(x))


def test_bench_block_bert_rows():
    from bench import block as bench_block

    rows = bench_block.run("bert", budgets=(), compiled_policies=(), **TINY_BLOCK)
    by_name = {r["variant"]: r for r in rows}
    refs = {"eager block", "torch checkpoint", "HF BertLayer eager", "HF gradient checkpointing"}
    assert refs <= set(by_name)
    for policy in bench_block.POLICIES:
        row = by_name[f"ckpt_ext {policy}"]
        assert row["kept"] == row["table"], policy  # the post-LN table (the pre-LN one keeps no pre-norm sums)
        assert row["flops"] >= 1.0
    assert by_name["HF BertLayer eager"]["flops"] == 1.0 and by_name["HF gradient checkpointing"]["flops"] > 1.0
    for row in rows:
        assert set(row["ratios"]) == refs
    table = bench_block.format_table(rows)
    assert "× HF eager" in table and "× HF grad ckpt" in table
    with pytest.raises(ValueError, match="lora"):
        bench_block.run("bert", budgets=(), compiled_policies=(), lora=4, **TINY_BLOCK)


def test_gpu_bert_bench_plumbing_on_cpu(tmp_path, monkeypatch, fused_calls):
    """bench/gpu_bert.py at its tiny CPU shapes (interpreter lane): every variant row runs, the ckpt_ext rows take the
    fused path (the padding as key ids) and match the HF layer within fp32 error; the CSV and markdown are written."""
    import csv

    from bench import gpu_bert
    from ckpt_ext.policies import POST_LN_POLICIES

    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_bert.main(["--device", "cpu"]) == 0
    with open(tmp_path / "gpu_bert.csv") as f:
        rows = list(csv.DictReader(f))
    names = [r["variant"] for r in rows]
    assert names[:3] == ["HF BertLayer", "torch checkpoint", "HF gradient_checkpointing (reentrant)"]
    assert names[3:] == [f"ckpt_ext {p}" for p in POST_LN_POLICIES]
    assert all(float(r["max_abs_err"]) < 1e-4 for r in rows)
    assert len(fused_calls) >= len(POST_LN_POLICIES)
    assert all(call[3] is None and call[5].min() == -1 for call in fused_calls)  # the padded batch's key ids
    assert (tmp_path / "gpu_bert.md").read_text().startswith("## BERT-base BertLayer")
