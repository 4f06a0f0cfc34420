"""torch.compile(fullgraph=True) traces the fused block's forward and backward (custom ops + autograd.Function)."""

import pytest
import torch

import ckpt_ext
from ckpt_ext import FusedCheckpointBlock

from helpers import make_block, run_step


@pytest.mark.parametrize(
    "compiler, policy",
    [("aot_eager", "none"), ("aot_eager", "pointwise"), ("aot_eager", "ffn"), ("aot_eager", "block"),
     ("inductor", "block")],
)  # fmt: skip
def test_compile_fullgraph_forward_backward(compiler, policy):
    torch._dynamo.reset()
    blk = make_block(72, 4)
    x, g = torch.randn(2, 7, 72), torch.randn(2, 7, 72)
    ref = run_step(FusedCheckpointBlock.from_block(blk, policy), x, g)
    fused = FusedCheckpointBlock.from_block(blk, policy)
    compiled = torch.compile(fused, fullgraph=True, backend=compiler)
    ours = run_step(compiled, x, g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert ckpt_ext.get_backend() == "auto"


@pytest.mark.parametrize("compiler, policy", [("aot_eager", "ffn"), ("aot_eager", "block"), ("inductor", "block")])
def test_compile_fullgraph_with_dropout(compiler, policy):
    """Dropout's per-call seed is drawn with .item(): fullgraph needs dynamo's capture_scalar_outputs. Under the same
    torch.manual_seed the compiled block draws the same seed, so forward and backward (recompute included) equal eager;
    inductor matches eager's RNG stream with fallback_random."""
    torch._dynamo.reset()
    blk = make_block(72, 4, dropout=0.1, attn_dropout=0.1)
    x, g = torch.randn(2, 7, 72), torch.randn(2, 7, 72)
    torch.manual_seed(5)
    ref = run_step(FusedCheckpointBlock.from_block(blk, policy), x, g)
    with torch._dynamo.config.patch(capture_scalar_outputs=True), torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(FusedCheckpointBlock.from_block(blk, policy), fullgraph=True, backend=compiler)
        torch.manual_seed(5)
        ours = run_step(compiled, x, g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
