"""torch.compile keeps each policy's memory promise: the compiled block saves what the eager block saves.

Under torch.compile the fused block runs as two opaque custom ops (ckpt_ext/compiled.py), so AOTAutograd's partitioner
cannot re-save what a policy recomputes. For every policy and both families (GPT-2: LayerNorm, GELU, packed qkv; Llama:
RMSNorm, SwiGLU, GQA, RoPE), with inductor and fullgraph=True: bytes saved for backward (saved_tensors_hooks, input and
parameters excluded) equal eager's up to the 8-byte seed tensor the compiled graph also saves, and the output, dx and
every parameter gradient equal eager's. bf16 autocast is carried into the opaque ops (same casts as eager).
"""

import pytest
import torch
from test_llama_block import llama_block, rope_tables

from bench.saved import saved_bytes
from ckpt_ext import FusedCheckpointBlock, policies
from ckpt_ext.compiled import _parse_spec, make_spec
from ckpt_ext.functional import param_names

from helpers import make_block

SEED_BYTES = 8  # the (1,) int64 seed tensor compiled graphs save (read only with dropout)


def _family(family):
    if family == "gpt2":
        return make_block(72, 4), (3, 7, 72), {}
    blk = llama_block(64, heads=4, kv=2, dtype=torch.float32)
    cos, sin = rope_tables(1, 7, 16, torch.float32)
    return blk, (3, 7, 64), {"position_embeddings": (cos, sin)}


def _step(module, x, g, kwargs):
    x = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    exclude = [x, *module.parameters(), *kwargs.get("position_embeddings", ())]
    kept, out = saved_bytes(module, x, exclude=exclude, **kwargs)
    out.backward(g)
    return kept, [out.detach(), x.grad] + [p.grad for _, p in module.named_parameters()]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("policy", list(policies.POLICIES))
def test_compiled_saves_what_eager_saves(family, policy):
    torch._dynamo.reset()
    blk, shape, kwargs = _family(family)
    x, g = torch.randn(shape), torch.randn(shape)
    eager_kept, ref = _step(FusedCheckpointBlock.from_block(blk, policy), x, g, kwargs)
    compiled = torch.compile(FusedCheckpointBlock.from_block(blk, policy), fullgraph=True)
    kept, ours = _step(compiled, x, g, kwargs)
    assert eager_kept <= kept <= eager_kept + SEED_BYTES, (kept, eager_kept)
    if policy == "block":
        assert kept < 0.1 * x.numel() * x.element_size()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_under_bf16_autocast_matches_eager():
    torch._dynamo.reset()
    blk, shape, kwargs = _family("llama")
    x, g = torch.randn(shape), torch.randn(shape)

    def fwd(module):
        def run(x, **kw):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return module(x, **kw)

        return run

    for policy in ("pointwise", "block"):
        eager_kept, ref = _step_fn(fwd(FusedCheckpointBlock.from_block(blk, policy)), blk, x, g, kwargs)
        compiled = torch.compile(fwd(FusedCheckpointBlock.from_block(blk, policy)), fullgraph=True)
        kept, ours = _step_fn(compiled, blk, x, g, kwargs)
        assert eager_kept <= kept <= eager_kept + SEED_BYTES
        assert ours[0].dtype == ref[0].dtype
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _step_fn(fn, blk, x, g, kwargs):
    x = x.detach().requires_grad_(True)
    blk.zero_grad(set_to_none=True)
    kept, out = saved_bytes(fn, x, exclude=[x, *blk.parameters(), *kwargs["position_embeddings"]], **kwargs)
    out.float().backward(g)
    return kept, [out.detach(), x.grad] + [p.grad for p in blk.parameters()]


def test_spec_round_trips_the_config():
    blk = FusedCheckpointBlock.from_block(llama_block(64, heads=4, kv=2, qk_norm=True), "ffn")
    cfg = blk.block_config()
    parsed, names, device_type, dtype = _parse_spec(make_spec(cfg, "cpu", "1" * 8 + "0" * 4))
    assert parsed == cfg and device_type == "cpu" and dtype is None
    assert names == param_names(cfg)[:8]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _parse_spec(make_spec(cfg, "cpu"))[3] == torch.bfloat16


@pytest.mark.parametrize("policy", ["none", "block"])
def test_opcheck_fused_block_ops(policy):
    """Schema, fake, autograd registration and AOT dispatch of the opaque forward/backward pair (GQA + RoPE form)."""
    from ckpt_ext.compiled import fused_block_bwd, fused_block_fwd

    blk = FusedCheckpointBlock.from_block(llama_block(16, heads=4, kv=2, d_ff=24, dtype=torch.float32), policy)
    cfg = blk.block_config()
    names = param_names(cfg)
    p = blk.parameter_tensors()
    params = [p[n] for n in names if p[n] is not None]
    spec = make_spec(cfg, "cpu", "".join("0" if p[n] is None else "1" for n in names))
    cos, sin = rope_tables(1, 3, 4, torch.float32)
    x, seed = torch.randn(2, 3, 16, requires_grad=True), torch.zeros(1, dtype=torch.int64)
    torch.library.opcheck(fused_block_fwd, (x, None, cos, sin, params, seed, spec, None))
    out, *saved = fused_block_fwd(x, None, cos, sin, params, seed, spec, None)
    args = (torch.randn_like(out), x.detach(), None, cos, sin, [w.detach() for w in params],
            [t.detach() for t in saved], seed, spec, None)  # fmt: skip
    torch.library.opcheck(fused_block_bwd, args)


def test_compiled_block_with_varying_lengths_and_a_padding_mask():
    """A second sequence length recompiles with dynamic shapes (the fakes run on symbolic sizes); a bool padding
    mask is a graph input the opaque ops take and save as eager does."""
    torch._dynamo.reset()
    blk = llama_block(64, heads=4, kv=2, dtype=torch.float32)
    compiled = torch.compile(FusedCheckpointBlock.from_block(blk, "block"), fullgraph=True)
    for t in (7, 9, 13):
        pe = rope_tables(1, t, 16, torch.float32)
        x, g = torch.randn(3, t, 64), torch.randn(3, t, 64)
        _, ref = _step(FusedCheckpointBlock.from_block(blk, "block"), x, g, {"position_embeddings": pe})
        _, ours = _step(compiled, x, g, {"position_embeddings": pe})
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    gpt = make_block(72, 4)
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., :2] = False
    x, g = torch.randn(3, 7, 72), torch.randn(3, 7, 72)
    kept_ref, ref = _step(FusedCheckpointBlock.from_block(gpt, "ffn"), x, g, {"attn_mask": mask})
    compiled = torch.compile(FusedCheckpointBlock.from_block(gpt, "ffn"), fullgraph=True)
    kept, ours = _step(compiled, x, g, {"attn_mask": mask})
    assert kept_ref <= kept <= kept_ref + SEED_BYTES + mask.numel()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
