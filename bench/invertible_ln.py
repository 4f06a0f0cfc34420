"""``python -m bench.invertible_ln``: the error of rebuilding post-LN's x̂2 from the block output, as γ2 gets small.

Post-LN's norm2 backward can read the block's output instead of keeping the pre-norm sum h2 (x̂ = (out - β)/γ,
DeepSpeed's normalize_invertible). The division amplifies the output's rounding where |γ| is small and |β| large.
For γ2 spanning [ratio, 1] in magnitude (log-spaced, β ~ N(1, 0.5)), fp32, this prints the largest error (relative to
each tensor's max) of the fused block with the rebuild forced on, against a float64 block, beside PyTorch's own fp32
block's error: the ratio column is what the tolerance rule bounds (≤ ~2-4). ckpt_ext rebuilds only where
min|γ| ≥ MIN_GAMMA·max|γ| (block_parts/norm.invertible) and keeps h2 otherwise.
"""

from __future__ import annotations

import argparse
import copy
from unittest import mock

import torch

from ckpt_ext import FusedCheckpointBlock, TransformerBlock
from ckpt_ext.block import init_block_
from ckpt_ext.block_parts.norm import MIN_GAMMA


def post_block(ratio: float, d: int, heads: int) -> TransformerBlock:
    """A post-LN block whose norm2 γ spans [ratio, 1] in magnitude (log-spaced, random signs), β ~ N(1, 0.5)."""
    torch.manual_seed(0)
    blk = TransformerBlock(d, heads, norm_placement="post", causal=False)
    init_block_(blk, std=0.2)
    with torch.no_grad():
        mags = torch.logspace(0, torch.log10(torch.tensor(ratio)).item(), d)
        blk.ln_2.weight.copy_(mags[torch.randperm(d)] * torch.sign(torch.randn(d)))
        blk.ln_2.bias.normal_(1.0, 0.5)
    return blk


def _step(module, x, grad):
    x = x.detach().requires_grad_(True)
    out = module(x)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad for p in module.parameters()]


def _max_rel(got, ref) -> float:
    return max(((a.double() - r) / (r.abs().max() + 1e-30)).abs().max().item() for a, r in zip(got, ref))


def measure(ratio: float, d: int = 256, heads: int = 4, batch: int = 4, seq: int = 64) -> tuple[float, float]:
    """(error of the forced rebuild, error of torch's fp32 block), each the max relative error over all outputs."""
    blk = post_block(ratio, d, heads)
    x, grad = torch.randn(batch, seq, d), torch.randn(batch, seq, d)
    ref = _step(copy.deepcopy(blk).double(), x.double(), grad.double())
    torch_err = _max_rel(_step(copy.deepcopy(blk), x, grad), ref)
    with mock.patch("ckpt_ext.block.invertible", lambda *a: True):
        ours = _step(FusedCheckpointBlock.from_block(copy.deepcopy(blk), "block"), x, grad)
    return _max_rel(ours, ref), torch_err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    args = ap.parse_args(argv)
    print(f"| min abs(γ) / max abs(γ) | rebuilt from the output: error | torch fp32: error | ratio | rebuilt by "
          f"ckpt_ext (threshold {MIN_GAMMA:g}) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for ratio in (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        ours, base = measure(ratio, args.d_model)
        print(f"| {ratio:g} | {ours:.2e} | {base:.2e} | {ours / base:.1f} | {'yes' if ratio >= MIN_GAMMA else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
