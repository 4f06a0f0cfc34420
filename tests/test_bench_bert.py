"""BERT in the benchmarks (issue 24): the roofline's transformers-BertLayer rows (ckpt_ext.roofline layer="hf_bert",
bench.roofline --family bert) and the post-LN TransformerBlock form (placement="post", causal=False)."""

from __future__ import annotations

import pytest
import torch

from ckpt_ext import roofline
from ckpt_ext.policies import POLICIES, retained_bytes

pytest.importorskip("transformers")

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
            policy, B, T, D, H, 4 * D, placement="post"
        )
        measured = roofline.retained_memory(policy, D, T, B, H, measured=True, **kw)
        assert measured == roofline.retained_memory(policy, D, T, B, H, **kw), policy
    with pytest.raises(ValueError, match="lora"):
        roofline.step_time("eager", D, T, B, H, layer="hf_bert", lora=4)
