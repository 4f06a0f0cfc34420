"""Retained activation memory and FLOPs per policy, measured on the op graph (the same graph a GPU runs).

Retained bytes are measured as the storages created during forward that are still alive after it (this sees inside
custom autograd.Functions and torch.utils.checkpoint) and must equal what the policy table in ckpt_ext.policies says.
"""

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from ckpt_ext import FusedCheckpointBlock, TransformerBlock, policies, retained_bytes
from ckpt_ext.measure import count_flops, retained_activation_bytes, training_step

from helpers import make_block

B, T, D, HEADS = 2, 64, 128, 4
LIMITS = {"pointwise": 10.0, "ffn": 6.0, "block": 0.25}  # × input bytes, from the table


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    blk = make_block(D, HEADS)
    x = torch.randn(B, T, D, requires_grad=True)
    return blk, x


def _ratio(nbytes, x):
    return nbytes / (x.numel() * x.element_size())


@pytest.mark.parametrize("policy", list(policies.POLICIES))
def test_retained_bytes_match_policy_table(setup, policy):
    blk, x = setup
    kept, out = retained_activation_bytes(FusedCheckpointBlock.from_block(blk, policy), x)
    assert kept == retained_bytes(policy, B, T, D, HEADS, 4 * D)
    eager_kept, _ = retained_activation_bytes(blk, x)
    assert kept <= eager_kept
    if policy in LIMITS:
        assert _ratio(kept, x) <= LIMITS[policy]


def test_retained_bytes_under_bf16_autocast(setup):
    """Matmul outputs are bf16, the residual stream and statistics fp32 (autocast's weight cache is freed on exit)."""
    blk, x = setup

    def forward(module, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return module(x)

    for policy in policies.POLICIES:
        kept, _ = retained_activation_bytes(forward, FusedCheckpointBlock.from_block(blk, policy), x)
        assert kept == retained_bytes(policy, B, T, D, HEADS, 4 * D, matmul_bytes=2), policy


def test_nothing_kept_without_grad(setup):
    blk, x = setup
    for policy in policies.POLICIES:
        with torch.no_grad():
            kept, out = retained_activation_bytes(FusedCheckpointBlock.from_block(blk, policy), x)
        assert kept == 0 and out.grad_fn is None


def test_policy_table_is_consistent():
    keeps = {name: set(p.keeps) for name, p in policies.POLICIES.items()}
    assert keeps["block"] < keeps["ffn"] < keeps["pointwise"] < keeps["none"]
    assert "x" in keeps["block"] and {"ln1_stats", "ln2_stats"} <= keeps["block"]
    for p in policies.POLICIES.values():
        assert set(p.keeps) | set(p.rebuilds) == set(policies.ALL_TENSORS)
    with pytest.raises(ValueError, match="unknown policy"):
        policies.get_policy("everything")


def test_flops_per_policy(setup):
    blk, x = setup
    g = torch.randn_like(x)
    flops = {p: count_flops(training_step, FusedCheckpointBlock.from_block(blk, p), x, g) for p in policies.POLICIES}
    eager = count_flops(training_step, blk, x, g)
    torch_ckpt = count_flops(lambda: checkpoint(blk, x, use_reentrant=False).backward(g))
    n, fc1 = B * T, 2 * B * T * D * 4 * D
    assert flops["none"] <= eager
    assert flops["pointwise"] == flops["none"]
    assert flops["ffn"] <= flops["none"] + fc1
    assert flops["block"] <= torch_ckpt
    # block recomputes exactly QKV, attention forward, proj and FC1 — never FC2
    attention_fwd = 4 * B * HEADS * T * T * (D // HEADS)
    assert flops["block"] - flops["none"] == 2 * n * D * 3 * D + attention_fwd + 2 * n * D * D + fc1


def test_dropout_adds_no_recompute_for_us_but_fc2_for_torch_checkpoint():
    """A dropout mask is a saved tensor to torch's checkpoint, so with dropout its recompute must rerun FC2 (whose
    output the mask follows); our masks are replayed from a seed, so the block policy's FLOPs do not change."""
    x = torch.randn(B, T, D, requires_grad=True)
    g = torch.randn_like(x)
    flops = {}
    for p in (0.0, 0.1):
        blk = TransformerBlock(D, HEADS, dropout=p)
        fused = FusedCheckpointBlock.from_block(blk, "block")
        torch_step = lambda b: checkpoint(b, x, use_reentrant=False).backward(g)  # noqa: E731
        flops[p] = (count_flops(training_step, fused, x, g), count_flops(torch_step, blk))
    fc2 = 2 * B * T * 4 * D * D
    assert flops[0.1][0] == flops[0.0][0]
    assert flops[0.1][1] == flops[0.0][1] + fc2


@pytest.mark.parametrize("policy", list(policies.POLICIES))
def test_retained_bytes_of_a_strided_input(setup, policy):
    """A non-contiguous input (x = (T, B, d).transpose(0, 1), not viewable as (B·T, d)) is kept as the caller's
    tensor, never as a private (B·T, d) copy (+1.0x the input): the table's bytes (here block 0.031x, ffn 5.06x), on the
    first and on the second call, with the contiguous input's gradients."""
    blk, x = setup
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # (B, T, D), strides (D, B·D, 1)
    assert not xt.is_contiguous() and torch.equal(xt, x)
    fused = FusedCheckpointBlock.from_block(blk, policy)
    want = retained_bytes(policy, B, T, D, HEADS, 4 * D)
    g = torch.randn_like(x)
    for _ in range(2):
        xt.grad = None
        kept, out = retained_activation_bytes(fused, xt)
        assert kept == want
        out.backward(g)
    x.grad = None
    fused(x).backward(g)
    torch.testing.assert_close(xt.grad, x.grad, rtol=1e-5, atol=1e-6)
    x.grad = None


def test_frozen_weights_skip_their_dw_flops(setup):
    """Issue 22: with every weight frozen (x still needs a gradient: a LoRA base model) each policy's step counts
    exactly the four dW GEMMs fewer (QKV, proj, FC1, FC2), and no more than the unconverted plain block's frozen step
    plus the policy's recompute."""
    blk, x = setup
    g = torch.randn_like(x)
    n = B * T
    dw = 2 * n * D * 3 * D + 2 * n * D * D + 2 * 2 * n * D * 4 * D
    plain = copy.deepcopy(blk)
    plain_full = count_flops(training_step, plain, x, g)
    plain.requires_grad_(False)
    plain_frozen = count_flops(training_step, plain, x, g)
    assert plain_full - plain_frozen == dw  # eager PyTorch skips them too
    full = {}
    for policy in policies.POLICIES:
        fused = FusedCheckpointBlock.from_block(copy.deepcopy(blk), policy)
        full[policy] = count_flops(training_step, fused, x, g)
        fused.requires_grad_(False)
        frozen = count_flops(training_step, fused, x, g)
        assert full[policy] - frozen == dw, policy
        assert frozen <= plain_frozen + (full[policy] - full["none"]), policy
