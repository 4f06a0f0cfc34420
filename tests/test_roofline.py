"""Structure of the roofline cost model (ckpt_ext.roofline) at small shapes: what each variant recomputes and keeps."""

from __future__ import annotations

import pytest
import torch

from ckpt_ext import roofline
from ckpt_ext.policies import retained_bytes

SHAPE = (64, 32, 2, 4)  # d_model, seq, batch, heads


def _trace(variant, dtype=torch.bfloat16):
    return roofline.step_trace(variant, *SHAPE, dtype=dtype)


def _names(variant, phase=None):
    return [op.name for op in _trace(variant).ops if phase is None or op.phase == phase]


def test_pricing_is_max_of_compute_and_memory_plus_launch():
    assert roofline.price(0, 0) == roofline.LAUNCH_S
    assert roofline.price(788e12, 0) == pytest.approx(1.0 + roofline.LAUNCH_S)
    assert roofline.price(788e12, 4.3e12 * 2) == pytest.approx(2.0 + roofline.LAUNCH_S)
    for op in _trace("eager").ops:
        assert op.seconds == pytest.approx(roofline.price(op.flops, op.bytes))


def test_views_and_metadata_cost_nothing():
    names = set(_names("eager")) | set(_names("block"))
    for free in ("aten::view", "aten::t", "aten::transpose", "aten::detach", "aten::_unsafe_view", "prim::device"):
        assert free not in names


def test_ckpt_ext_ops_are_one_kernel_each():
    fwd, bwd = _names("ffn", "forward"), _names("ffn", "backward")
    assert fwd.count("ckpt_ext::layer_norm_fwd") == 2 and fwd.count("ckpt_ext::attention_fwd") == 1
    assert bwd.count("ckpt_ext::ffn_recompute") == 1 and bwd.count("ckpt_ext::layer_norm_bwd") == 2
    assert not any(n.startswith("aten::native_layer_norm") for n in fwd + bwd)
    assert "ckpt_ext::linear_gelu_bwd" in _names("pointwise", "backward")


def test_torch_checkpointing_costs_more_than_eager():
    eager, ckpt, reentrant = (roofline.step_time(v, *SHAPE) for v in ("eager", "checkpoint", "checkpoint_reentrant"))
    assert eager < ckpt < reentrant  # non-reentrant stops early: its last matmul is not recomputed
    assert roofline.overhead("checkpoint", *SHAPE) == pytest.approx(ckpt / eager - 1.0)
    assert roofline.overhead("eager", *SHAPE, baseline="checkpoint") < 0


def test_extra_flops_per_policy():
    flops = {v: _trace(v).flops for v in roofline.VARIANTS}
    d, t, b, _ = SHAPE
    fc1 = 2 * b * t * d * 4 * d
    assert flops["none"] == flops["pointwise"] == flops["eager"]  # no matmul recomputed
    assert flops["ffn"] == flops["eager"] + fc1  # FC1 once
    assert flops["eager"] < flops["block"] <= flops["checkpoint"] < flops["checkpoint_reentrant"]
    assert flops["selective"] == flops["eager"]


def test_retained_memory():
    d, t, b, h = SHAPE
    x_bytes = b * t * d * 2
    measured = {v: _trace(v).retained_bytes for v in roofline.VARIANTS}
    assert measured["checkpoint"] == measured["checkpoint_reentrant"] == 0
    assert measured["none"] > measured["pointwise"] > measured["ffn"] > measured["block"]
    assert measured["block"] <= 0.25 * x_bytes
    assert measured["selective"] < measured["eager"]
    for policy in roofline.POLICY_VARIANTS:
        table = retained_bytes(policy, b, t, d, h, 4 * d, act_bytes=2, matmul_bytes=2, stat_bytes=4)
        assert measured[policy] == table == roofline.retained_memory(policy, *SHAPE)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        roofline.step_time("nope", *SHAPE)


def test_cli_prints_the_table(capsys):
    from bench import roofline as cli

    table = cli.rows(shapes=(SHAPE,))
    text = cli.markdown(table, shapes=(SHAPE,))
    assert text.count("\n") == len(roofline.VARIANTS) + 1
    assert "ckpt_ext block" in text and "torch checkpoint (reentrant)" in text
    assert "target" in cli.target_report(table, shapes=(SHAPE,))
