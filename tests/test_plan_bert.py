"""The planner's BERT entry (BertForMaskedLM, post-LN): per-layer retained bytes of every ckpt_ext policy from the
post-LN table, equal to what the converted BertLayer keeps under a fake-tensor trace (and not the pre-LN table's);
the whole step's kept and peak bytes against a real CPU training step (LiveBytes, as tests/test_plan_hf.py measures
GPT-2 and Llama); the CLI on a config.json; the masked-LM head has no fused-head rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers  # noqa: E402  (make test installs it: missing, this file fails)

from ckpt_ext.planner_fit import plan_model, strategies  # noqa: E402
from ckpt_ext.planner_model import MemoryModel  # noqa: E402
from ckpt_ext.planner_spec import ModelSpec, Setup  # noqa: E402
from ckpt_ext.planner_trace import LiveBytes, trace_layer  # noqa: E402
from ckpt_ext.policies import POLICIES, retained_bytes  # noqa: E402

from helpers import apply_layer_kinds  # noqa: E402

B, T, V, D, HEADS, FF = 2, 64, 512, 64, 4, 256


def tiny_bert(**kw):
    base = dict(hidden_size=D, num_hidden_layers=4, num_attention_heads=HEADS, intermediate_size=FF, vocab_size=V,
                max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.BertConfig(**{**base, **kw})


@pytest.mark.parametrize("policy", list(POLICIES))
def test_layer_bytes_are_the_post_ln_table(policy):
    spec = ModelSpec(tiny_bert(), Setup(param_dtype="fp32", compute_dtype="fp32"))
    assert spec.family.name == "BERT" and spec.family.placement == "post" and spec.n_layers == 4
    predicted = MemoryModel(spec).layer_bytes(policy, B, T) - B * T * D * 4  # beyond the layer input
    # fp32: norm2's backward rebuilds x̂ from the layer's output, so h2 is not kept (block_parts/norm.invertible)
    post = retained_bytes(policy, B, T, D, HEADS, FF, placement="post", ln2_from_out=True)
    traced = trace_layer(spec.template, policy, T, "fp32", "fp32", None, B, False).retained
    assert predicted == post == traced, (predicted, post, traced)
    assert post == retained_bytes(policy, B, T, D, HEADS, FF, placement="post") - B * T * D * 4  # h2, fp32


def _model(cfg, kinds, cls=None):
    torch.manual_seed(0)
    return apply_layer_kinds((cls or transformers.BertForMaskedLM)(cfg).train(), ("BertLayer",), kinds)


def _measure(model, ids, autocast: bool, labels=None) -> tuple[int, int]:
    grads = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad))
    live = LiveBytes()
    with live:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids if labels is None else labels)
        kept = live.alive()
        out.loss.backward()
    return kept, live.peak(exclude=grads)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_predicted_memory_matches_a_cpu_training_step(autocast):
    cfg = tiny_bert()
    memory = MemoryModel(ModelSpec(cfg, Setup(param_dtype="fp32", compute_dtype="bf16" if autocast else "fp32")))
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    for label, kinds in strategies(4):
        kept, peak = _measure(_model(cfg, kinds), ids, autocast)
        pred_kept, pred_peak = memory.step(kinds, "hf", B, T)
        assert abs(pred_kept - kept) <= 0.1 * kept, (label, kept, pred_kept)
        assert abs(pred_peak - peak) <= 0.1 * peak, (label, peak, pred_peak)


def test_classifier_entry_matches_a_cpu_training_step():
    """A config naming BertForSequenceClassification (or such a model) gets the classifier entry: pooler on token 0
    and a small classifier, no LM head; fp32 step memory within 10% (the model's own bytes, no logits)."""
    cfg = tiny_bert(architectures=["BertForSequenceClassification"], num_labels=3)
    spec = ModelSpec(cfg, Setup(param_dtype="fp32", compute_dtype="fp32"))
    assert spec.family.auto_class == "AutoModelForSequenceClassification" and not spec.family.lm_head
    model = transformers.BertForSequenceClassification(tiny_bert(num_labels=3))
    assert ModelSpec(model, Setup()).family.auto_class == "AutoModelForSequenceClassification"  # by its class
    memory = MemoryModel(spec)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    for label, kinds in strategies(4):
        model = _model(cfg, kinds, transformers.BertForSequenceClassification)
        kept, peak = _measure(model, ids, False, labels=torch.tensor([0, 2]))
        pred_kept, pred_peak = memory.step(kinds, "hf", B, T)
        assert abs(pred_kept - kept) <= 0.1 * kept, (label, kept, pred_kept)
        assert abs(pred_peak - peak) <= 0.1 * peak, (label, peak, pred_peak)
    assert {r.head for r in plan_model(cfg, seq_len=128, memory_budget="64MiB").rows} == {"-"}


def test_plan_rows_and_cli(tmp_path):
    cfg = tiny_bert()
    report = plan_model(cfg, seq_len=128, memory_budget="256MiB")
    assert {r.head for r in report.rows} == {"hf"} and len(report.rows) == 9  # no fused head for a masked LM
    exact = MemoryModel(report.spec, exact=True)
    for row in report.rows:
        assert state_fits(report, exact, row, row.answer) and not state_fits(report, exact, row, row.answer + 1)
    assert report.row("ckpt_ext block", "hf").answer > report.row("no checkpointing", "hf").answer
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "ckpt_ext.plan", "--config", str(path), "--seq", "128",
                          "--gpu-memory", "256MiB"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "BERT (bert): 4 layers" in out and "ckpt_ext block" in out and "masked-LM" in out


def state_fits(report, exact, row, batch) -> bool:
    return report.spec.state_bytes + exact.step(row.kinds, row.head, batch, 128)[1] <= report.budget
