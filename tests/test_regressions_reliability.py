"""Issue 15 regressions found by hand and by the property lane (tests/test_property.py), pinned as explicit cases.

Each case runs tests/block_cases.check_parity: FusedCheckpointBlock's output, dx and every parameter gradient against
the plain TransformerBlock (same weights) in the same dtype and in float64, and nothing non-finite where the plain
block is finite. What each case broke on main when the issue was filed (0ee6f35):
- B=0 / T=0 with grad: backward raised "cannot reshape tensor of 0 elements" in attention_bwd (item 3).
- head_dim 1: "view size is not compatible" on the reference backend, and on cpp with a mask (item 4).
- rows with no visible key (bool padding rows, -inf left padding with causality): NaN dx where the plain block's
  gradients are finite.
"""

from __future__ import annotations

import pytest

from block_cases import check_dropout_policies, check_parity

BASE = dict(b=2, t=5, d=8, heads=2, head_dim=None, kv=None, d_ff=16, activation="gelu", causal=True, dtype="float32",
            mask="none", mask_shape="B1TT", padding="none", policy="block", backend="cpp", p=0.0, p_attn=0.0,
            seed=1)  # fmt: skip

CASES = {
    "batch0-cpp": dict(b=0),
    "batch0-reference-bool": dict(b=0, backend="reference", mask="bool", padding="right"),
    "seq0": dict(t=0),
    "seq0-swiglu": dict(t=0, activation="swiglu", kv=1, policy="ffn"),
    "head_dim1-reference": dict(heads=8, backend="reference"),
    "head_dim1-cpp-bool-mask": dict(heads=8, mask="bool", padding="right"),
    "head_dim1-explicit-odd-d": dict(d=7, heads=3, head_dim=1, mask="-inf", padding="left", policy="pointwise"),
    "empty-rows-bool": dict(mask="bool", padding="rows"),
    "empty-rows-bool-reference": dict(mask="bool", padding="rows", backend="reference", policy="none"),
    "left-padding-inf": dict(mask="-inf", padding="left"),
    "left-padding-finfo-min-bf16": dict(mask="finfo.min", padding="left", dtype="bfloat16", policy="ffn"),
    "not-causal-empty-rows-heads": dict(causal=False, mask="-inf", mask_shape="BHTT", padding="rows", b=3, t=7),
    "d1-heads1": dict(d=1, heads=1, d_ff=1, t=1, b=1),
    "swiglu-gqa-finfo-min": dict(
        activation="swiglu", heads=2, kv=1, head_dim=3, d=7, mask="finfo.min", padding="left", policy="block_keep_attn"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pinned_case(name):
    check_parity(BASE | CASES[name])


@pytest.mark.parametrize("policy", ["pointwise", "ffn", "block_keep_attn", "block"])
def test_dropout_with_empty_rows_matches_policy_none(policy):
    check_dropout_policies(BASE | dict(policy=policy, p=0.1, p_attn=0.2, mask="bool", padding="rows", b=3, t=7))
