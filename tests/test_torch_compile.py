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
