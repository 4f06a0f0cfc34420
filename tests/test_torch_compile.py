"""torch.compile(fullgraph=True) traces the fused block's forward and backward (custom ops + autograd.Function)."""

import pytest
import torch

import ckpt_ext
from ckpt_ext import FusedCheckpointBlock

from helpers import make_block, run_step


@pytest.mark.parametrize("policy", ["pointwise", "block"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_backward(policy, compiler):
    if compiler == "inductor" and policy == "pointwise":
        pytest.skip("one inductor case is enough for the time budget; aot_eager covers every policy's graph")
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
