"""torch.compile(fullgraph=True) traces the fused block's forward and backward (custom ops + autograd.Function).

Dropout under compile: the seed is a tensor drawn inside the graph (ckpt_ext/seeds.py), so a compiled training loop
draws new masks every step with no dynamo flags, replays them exactly in recompute (the `block` policy, which rebuilds
the attention half in backward, equals `none`, which rebuilds nothing, under the same RNG stream), and with inductor's
fallback_random draws exactly eager's seeds."""

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
    """No dynamo flags: the seed is a tensor drawn in the graph (no .item(), so capture_scalar_outputs stays off).
    Under the same torch.manual_seed the compiled block draws the same seed, so forward and backward (recompute
    included) equal eager; inductor matches eager's RNG stream with fallback_random."""
    torch._dynamo.reset()
    assert not torch._dynamo.config.capture_scalar_outputs
    blk = make_block(72, 4, dropout=0.1, attn_dropout=0.1)
    x, g = torch.randn(2, 7, 72), torch.randn(2, 7, 72)
    torch.manual_seed(5)
    ref = run_step(FusedCheckpointBlock.from_block(blk, policy), x, g)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(FusedCheckpointBlock.from_block(blk, policy), fullgraph=True, backend=compiler)
        torch.manual_seed(5)
        ours = run_step(compiled, x, g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _loop(module, x, g, steps):
    return [run_step(module, x, g) for _ in range(steps)]


def test_compiled_dropout_new_masks_each_step_replayed_in_recompute():
    torch._dynamo.reset()
    blk = make_block(72, 4, dropout=0.2, attn_dropout=0.2)
    x, g = torch.randn(3, 7, 72), torch.randn(3, 7, 72)
    runs = {}
    for policy in ("none", "block"):
        compiled = torch.compile(FusedCheckpointBlock.from_block(blk, policy), fullgraph=True)
        torch.manual_seed(11)
        runs[policy] = _loop(compiled, x, g, 2)
    first, second = runs["block"]
    assert not torch.equal(first[0], second[0]), "two compiled steps used the same dropout masks"
    for step_none, step_block in zip(runs["none"], runs["block"]):  # a wrong mask differs by O(1), fp32 order by 1e-6
        for a, b in zip(step_block, step_none):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_dropout_equals_eager_step_by_step_with_fallback_random():
    torch._dynamo.reset()
    blk = make_block(72, 4, dropout=0.2, attn_dropout=0.1)
    x, g = torch.randn(1, 33, 72), torch.randn(1, 33, 72)
    torch.manual_seed(3)
    ref = _loop(FusedCheckpointBlock.from_block(blk, "ffn"), x, g, 3)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(FusedCheckpointBlock.from_block(blk, "ffn"), fullgraph=True)
        torch.manual_seed(3)
        ours = _loop(compiled, x, g, 3)
    assert not torch.equal(ref[0][0], ref[1][0])
    for step_ours, step_ref in zip(ours, ref):
        for a, b in zip(step_ours, step_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_seeded_block_ops_stay_out_of_cuda_graphs():
    """With dropout the seed is read on the host, so those ops are cudagraph_unsafe; without it they are not."""
    assert torch.Tag.cudagraph_unsafe in torch.ops.ckpt_ext.fused_block_fwd_seeded.default.tags
    assert torch.Tag.cudagraph_unsafe in torch.ops.ckpt_ext.fused_block_bwd_seeded.default.tags
    assert torch.Tag.cudagraph_unsafe not in torch.ops.ckpt_ext.fused_block_fwd.default.tags


def test_seed_helpers():
    from ckpt_ext import seeds

    torch.manual_seed(4)
    drawn = seeds.seed_tensor(seeds.DEVICE_SEED, torch.device("cpu"))
    torch.manual_seed(4)
    assert seeds.host_seed() == seeds.seed_value(drawn)
    assert seeds.seed_value(seeds.seed_tensor(123, torch.device("cpu"))) == 123
    assert not seeds.capturing()


def test_compiled_dropout_without_grad_and_with_traced_item_seeds():
    """No grad (train mode, dropout on): the seed is still drawn in the graph. An explicit .item() seed traced with
    capture_scalar_outputs (what the Hugging Face adapters pass) is honoured: compiled equals eager."""
    from ckpt_ext.block import fused_block
    from ckpt_ext.spec import BlockConfig, BlockSpec

    torch._dynamo.reset()
    blk = FusedCheckpointBlock.from_block(make_block(72, 4, dropout=0.3), "pointwise")
    x = torch.randn(3, 7, 72)
    with torch.no_grad(), torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(blk, fullgraph=True)
        torch.manual_seed(2)
        ours = [compiled(x) for _ in range(2)]
        torch.manual_seed(2)
        ref = [blk(x) for _ in range(2)]
    assert not torch.equal(ours[0], ours[1])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def explicit_seed(x):
        seed = int(torch.randint(0, 2**31 - 8, (1,)).item())
        cfg = BlockConfig(BlockSpec(4, True, 1e-5), "block", seed, 0.1, 0.3)
        return fused_block(x, blk.parameter_tensors(), cfg)

    xg = x.clone().requires_grad_(True)
    with torch._dynamo.config.patch(capture_scalar_outputs=True), torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(8)
        out = torch.compile(explicit_seed, fullgraph=True)(xg)
        (dx,) = torch.autograd.grad(out.sum(), xg)
    torch.manual_seed(8)
    ref_out = explicit_seed(xg)
    (ref_dx,) = torch.autograd.grad(ref_out.sum(), xg)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["ffn", "block"])
def test_compiled_frozen_weights_get_no_gradient(policy):
    """Issue 22: under compile the opaque backward op skips frozen weights' dW (empty outputs, None gradients); the
    trained ones equal eager's."""
    torch._dynamo.reset()
    blk = make_block(72, 4)
    for name, p in blk.named_parameters():
        p.requires_grad_(not name.endswith("weight") or "ln" in name)  # matrices frozen, biases and norms train
    x, g = torch.randn(2, 7, 72), torch.randn(2, 7, 72)
    ref = run_step(FusedCheckpointBlock.from_block(blk, policy), x, g)
    compiled = torch.compile(FusedCheckpointBlock.from_block(blk, policy), fullgraph=True, backend="aot_eager")
    ours = run_step(compiled, x, g)
    frozen = [not p.requires_grad for p in blk.parameters()]
    assert any(frozen) and [a is None for a in ours[2:]] == frozen
    for a, b in zip(ours, ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _graph_steps(module, x, g, steps=3):
    """``steps`` training steps, each result cloned (CUDA graphs reuse their output memory on the next replay);
    cudagraph_mark_step_begin marks each step's start, as a training loop under reduce-overhead does."""
    runs = []
    for _ in range(steps):
        torch.compiler.cudagraph_mark_step_begin()
        runs.append([None if t is None else t.clone() for t in run_step(module, x, g)])
    return runs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["pointwise", "block"])
def test_reduce_overhead_mode_matches_eager(device, policy):
    """torch.compile(mode="reduce-overhead") (CUDA graphs over Inductor's code on a GPU; Inductor alone on CPU, where
    cudagraphs do not apply): three steps (warm-up, record, replay on a GPU), forward and every gradient equal to the
    eager block's."""
    torch._dynamo.reset()
    blk = make_block(72, 4).to(device)
    x, g = torch.randn(2, 7, 72, device=device), torch.randn(2, 7, 72, device=device)
    ref = run_step(FusedCheckpointBlock.from_block(blk, policy), x, g)
    compiled = torch.compile(FusedCheckpointBlock.from_block(blk, policy), mode="reduce-overhead")
    for ours in _graph_steps(compiled, x, g):
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_reduce_overhead_mode_on_a_converted_hf_llama(device, fused_calls):
    """A tiny Hugging Face Llama converted by apply_fused_checkpointing, under torch.compile(mode="reduce-overhead"):
    loss and every parameter gradient equal to the converted model run eagerly, on three steps; both layers take the
    fused path in the compiled model too."""
    import transformers

    from ckpt_ext.integrations.huggingface import apply_fused_checkpointing

    torch._dynamo.reset()
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device).train()
    assert apply_fused_checkpointing(model, policy="block") == 2
    ids = torch.randint(1, 61, (2, 9), device=device)

    def loss_of(m):
        return m(input_ids=ids, labels=ids).loss

    def step(fn):
        model.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        loss = fn(model)
        loss.backward()
        return loss.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want = step(loss_of)
    assert len(fused_calls) == 2
    compiled = torch.compile(loss_of, mode="reduce-overhead")
    for _ in range(3):
        loss, grads = step(compiled)
        torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-6)
        assert grads.keys() == want[1].keys()
        for name, g in want[1].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert len(fused_calls) >= 4
