"""Post-LN's norm2 backward from the block's output (DeepSpeed's invertible LayerNorm): x̂ = (out - β)/γ.

The error it adds is measured against a float64 reference as γ gets small entries, and the block falls back to keeping
the pre-norm sum h2 where it would not be exact enough (block_parts/norm.invertible: bf16 outputs, or some |γ| below
MIN_GAMMA·max|γ|).
"""

import copy

import pytest
import torch

from bench.invertible_ln import post_block
from ckpt_ext import FusedCheckpointBlock
from ckpt_ext.block_parts.norm import MIN_GAMMA, invertible
from ckpt_ext.measure import retained_activation_bytes
from ckpt_ext.policies import retained_bytes
from ckpt_ext.spec import BlockSpec

from helpers import run_step

B, T, D, H = 2, 9, 72, 4


def _post_block(gamma_min_ratio: float, dtype=torch.float32):
    return post_block(gamma_min_ratio, D, H).to(dtype)


def _errors(blk, policy: str):
    """(max error of ours, of torch's own fp32 block) against the float64 block, over output, dx and every grad."""
    x = torch.randn(B, T, D)
    grad = torch.randn_like(x)
    ref = run_step(copy.deepcopy(blk).double(), x.double(), grad.double())
    ours = run_step(FusedCheckpointBlock.from_block(blk, policy), x, grad)
    torch_fp32 = run_step(blk, x, grad)
    err = max(((a.double() - r) / (r.abs().max() + 1e-30)).abs().max().item() for a, r in zip(ours, ref))
    base = max(((a.double() - r) / (r.abs().max() + 1e-30)).abs().max().item() for a, r in zip(torch_fp32, ref))
    return err, base


@pytest.mark.parametrize("policy", ["ffn", "block"])
def test_well_conditioned_gamma_rebuilds_from_the_output_within_the_tolerance_rule(policy):
    blk = _post_block(0.3)
    assert invertible(blk.ln_2.weight, torch.float32, BlockSpec(H))
    err, base = _errors(blk, policy)
    assert err <= 4 * base + 1e-6, (err, base)
    x = torch.randn(B, T, D, requires_grad=True)
    kept, _ = retained_activation_bytes(FusedCheckpointBlock.from_block(blk, policy), x)
    assert kept == retained_bytes(policy, B, T, D, H, 4 * D, placement="post", ln2_from_out=True)


def test_at_the_threshold_the_rebuild_is_still_within_the_tolerance_rule():
    """γ spanning [MIN_GAMMA, 1] (the smallest ratio that is still rebuilt): error within 4x torch's own."""
    blk = _post_block(MIN_GAMMA * 1.01)
    assert invertible(blk.ln_2.weight, torch.float32, BlockSpec(H))
    err, base = _errors(blk, "block")
    assert err <= 4 * base + 1e-6, (err, base)


def test_tiny_gamma_keeps_the_pre_norm_sum_and_stays_exact():
    """γ spanning [1e-5, 1]: rebuilding x̂ would divide rounding by 1e-5, so the block keeps h2 instead."""
    blk = _post_block(1e-5)
    assert not invertible(blk.ln_2.weight, torch.float32, BlockSpec(H))
    err, base = _errors(blk, "block")
    assert err <= 4 * base + 1e-6, (err, base)
    x = torch.randn(B, T, D, requires_grad=True)
    kept, _ = retained_activation_bytes(FusedCheckpointBlock.from_block(blk, "block"), x)
    assert kept == retained_bytes("block", B, T, D, H, 4 * D, placement="post")  # h2 included


def test_bf16_outputs_are_not_rebuilt():
    assert not invertible(torch.ones(D), torch.bfloat16, BlockSpec(H))
    assert invertible(torch.ones(D), torch.float32, BlockSpec(H))
    assert not invertible(torch.tensor([1.0, 0.0]), torch.float32, BlockSpec(H))


def test_the_gamma_check_is_cached_for_a_frozen_gamma_only(monkeypatch):
    """A frozen γ (LoRA fine-tuning, evaluation) is read once per version: repeated calls reuse the answer (no host
    sync), an in-place write is seen at the next call. A trainable γ is read at every call, since fused optimizers
    step it without a version bump (AdamW(fused=True) below: the answer follows the step)."""
    spec = BlockSpec(4, False, 1e-12, placement="post")
    w = torch.nn.Parameter(torch.ones(16), requires_grad=False)
    assert invertible(w, torch.float32, spec)
    reads = []
    real_abs = torch.Tensor.abs
    monkeypatch.setattr(torch.Tensor, "abs", lambda self: reads.append(1) or real_abs(self))
    assert invertible(w, torch.float32, spec) and reads == []  # cached
    with torch.no_grad():
        w[3] = MIN_GAMMA / 10
    assert not invertible(w, torch.float32, spec) and len(reads) == 1
    offset = BlockSpec(4, False, 1e-12, placement="post", norm_offset=1.0)  # another spec offset: another answer
    assert invertible(w, torch.float32, offset) and len(reads) == 2

    trained = torch.nn.Parameter(torch.ones(16))
    assert invertible(trained, torch.float32, spec)
    trained.grad = torch.zeros(16)
    trained.grad[3] = 1.0
    opt = torch.optim.AdamW([trained], lr=0.9999, betas=(0.0, 0.0), weight_decay=0.0, eps=1e-12, fused=True)
    version = trained._version
    opt.step()  # γ[3] -> about 1e-4, in place
    assert trained[3].abs() < MIN_GAMMA
    assert not invertible(trained, torch.float32, spec), f"version {version} -> {trained._version}"
