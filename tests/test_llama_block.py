"""The Llama-form block (RMSNorm, SwiGLU, RoPE, GQA, Qwen3 q/k norm) and the block_keep_attn policy on the op graph.

Parity: FusedCheckpointBlock vs the plain TransformerBlock (same weights) in float64 for every policy and backend at
awkward shapes; retained bytes measured against the policy table (fp32 and bf16 autocast); FLOPs per policy
(block_keep_attn = block minus the attention forward); traps (a second backward through retained graph, GQA sums);
bad input names the argument.
"""

import copy

import pytest
import torch

import ckpt_ext
from ckpt_ext import FusedCheckpointBlock, TransformerBlock, policies, retained_bytes
from ckpt_ext.block import init_block_
from ckpt_ext.measure import count_flops, retained_activation_bytes

POLICIES = list(policies.POLICIES)


def llama_block(d=72, heads=6, kv=2, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("d_ff", 100)
    blk = TransformerBlock(d, heads, activation="swiglu", n_kv_heads=kv, **kwargs)
    init_block_(blk, std=0.2)
    with torch.no_grad():
        for name, p in blk.named_parameters():
            if "ln_" in name or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return blk.to(dtype)


def rope_tables(b, t, dh, dtype=torch.float64, per_batch=False):
    pos = torch.arange(t, dtype=torch.float64)[None].expand(b if per_batch else 1, t)
    pos = pos + (torch.arange(b)[:, None] if per_batch else 0)  # left-padding-like shifted positions per row
    inv = 10000.0 ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = pos[..., None] * inv
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def run(module, x, grad, **kw):
    x = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x, **kw)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad for _, p in module.named_parameters()]


def f64_plain(blk: TransformerBlock) -> TransformerBlock:
    """The plain block computing its RMSNorms in float64 too (the HF-style module rounds through fp32)."""
    ref = copy.deepcopy(blk)
    for m in ref.modules():
        if isinstance(m, ckpt_ext.block.RMSNorm):
            m.forward = lambda x, m=m: m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps))
    return ref


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 33)])
def test_parity_float64(backend, policy, shape):
    b, t = shape
    blk = llama_block(qkv_bias=True)
    x, g = torch.randn(b, t, 72, dtype=torch.float64), torch.randn(b, t, 72, dtype=torch.float64)
    pe = rope_tables(b, t, blk.head_dim, per_batch=True)
    ref = run(f64_plain(blk), x, g, position_embeddings=pe)
    with ckpt_ext.set_backend(backend):
        got = run(FusedCheckpointBlock.from_block(copy.deepcopy(blk), policy), x, g, position_embeddings=pe)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kv", [1, 3, 6])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_gqa_qk_norm_masks_float64(kv, mask_kind):
    blk = llama_block(kv=kv, qk_norm=True, head_dim=8)
    b, t = 2, 9
    x, g = torch.randn(b, t, 72, dtype=torch.float64), torch.randn(b, t, 72, dtype=torch.float64)
    mask = None
    if mask_kind:
        keep = torch.ones(b, 1, t, t, dtype=torch.bool)
        keep[0, ..., :3] = False  # left padding of row 0: its first 3 queries see nothing (causal)
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, -1e4)
    pe = rope_tables(b, t, 8)
    ref = run(f64_plain(blk), x, g, attn_mask=mask, position_embeddings=pe)
    for policy in ("none", "ffn", "block_keep_attn", "block"):
        got = run(FusedCheckpointBlock.from_block(copy.deepcopy(blk), policy), x, g, attn_mask=mask,
                  position_embeddings=pe)  # fmt: skip
        rows = slice(None) if mask_kind is None else (slice(1, 2),)  # fully masked rows of batch 0 differ by design
        torch.testing.assert_close(got[0][rows], ref[0][rows], rtol=1e-9, atol=1e-11)
        if mask_kind is None:
            for a, r in zip(got[1:], ref[1:]):
                torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


def test_bf16_autocast_within_pytorch_error():
    blk = llama_block(d=200, heads=10, kv=2, dtype=torch.float32, d_ff=272)
    b, t = 3, 33
    x, g = torch.randn(b, t, 200), torch.randn(b, t, 200)
    pe = rope_tables(b, t, 20, torch.float32)
    ref64 = run(f64_plain(blk.double()), x.double(), g.double(), position_embeddings=tuple(c.double() for c in pe))
    blk = blk.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = run(blk, x, g, position_embeddings=pe)
        for policy in POLICIES:
            ours = run(FusedCheckpointBlock.from_block(copy.deepcopy(blk), policy), x, g, position_embeddings=pe)
            for a, h, r in zip(ours, theirs, ref64):
                err, base = (a.double() - r).abs().max(), (h.double() - r).abs().max()
                assert err <= 3 * base + 1e-3 * r.abs().max(), (policy, err.item(), base.item())


@pytest.mark.parametrize("qk_norm", [False, True])
def test_retained_bytes_match_table(qk_norm):
    b, t, d, heads, kv, dh, ff = 2, 16, 64, 8, 2, 8, 96
    blk = llama_block(d, heads, kv, torch.float32, d_ff=ff, qk_norm=qk_norm, head_dim=dh)
    x = torch.randn(b, t, d, requires_grad=True)
    pe = rope_tables(b, t, dh, torch.float32)
    shape = dict(n_kv_heads=kv, head_dim=dh, norm="rmsnorm", mlp="swiglu", qk_norm=qk_norm)
    eager, _ = retained_activation_bytes(lambda x: blk(x, position_embeddings=pe), x)
    for policy in POLICIES:
        fused = FusedCheckpointBlock.from_block(blk, policy)
        kept, _ = retained_activation_bytes(lambda x, f=fused: f(x, position_embeddings=pe), x)
        assert kept == retained_bytes(policy, b, t, d, heads, ff, **shape), policy
        assert kept <= eager
    block = FusedCheckpointBlock.from_block(blk, "block")
    kept, _ = retained_activation_bytes(lambda x: block(x, position_embeddings=pe), x)
    assert kept == 2 * b * t * 4  # a block-policy layer keeps nothing but its input and two fp32 rstd rows


def test_retained_bytes_bf16_autocast():
    b, t, d, heads, kv, ff = 2, 16, 64, 8, 4, 96
    blk = llama_block(d, heads, kv, torch.float32, d_ff=ff)
    x = torch.randn(b, t, d, requires_grad=True)
    pe = rope_tables(b, t, d // heads, torch.float32)

    def fwd(module, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return module(x, position_embeddings=pe)

    for policy in POLICIES:
        kept, _ = retained_activation_bytes(fwd, FusedCheckpointBlock.from_block(blk, policy), x)
        expect = retained_bytes(policy, b, t, d, heads, ff, matmul_bytes=2, n_kv_heads=kv, norm="rmsnorm", mlp="swiglu")
        assert kept == expect, policy


def test_flops_block_keep_attn_skips_attention_forward():
    b, t, d, heads, kv, ff = 2, 32, 64, 8, 2, 96
    blk = llama_block(d, heads, kv, torch.float32, d_ff=ff)
    x, g = torch.randn(b, t, d, requires_grad=True), torch.randn(b, t, d)
    pe = rope_tables(b, t, d // heads, torch.float32)

    def step(m):
        m(x, position_embeddings=pe).backward(g)

    flops = {p: count_flops(step, FusedCheckpointBlock.from_block(blk, p)) for p in POLICIES}
    n, dh = b * t, d // heads
    qkv = 2 * n * d * (heads + 2 * kv) * dh
    attention_fwd = 4 * b * heads * t * t * dh
    proj = 2 * n * heads * dh * d
    gate_up = 4 * n * d * ff
    assert flops["pointwise"] == flops["none"]
    assert flops["ffn"] == flops["none"] + gate_up
    assert flops["block"] == flops["none"] + qkv + attention_fwd + proj + gate_up
    assert flops["block_keep_attn"] == flops["block"] - attention_fwd


def test_block_keep_attn_gpt2_dropout_replayed():
    """GPT-2 form with attention + residual dropout: same seed -> the same grads as `none` (masks replayed)."""
    torch.manual_seed(0)
    blk = TransformerBlock(48, 4, dropout=0.2, attn_dropout=0.2).double()
    x, g = torch.randn(2, 11, 48, dtype=torch.float64), torch.randn(2, 11, 48, dtype=torch.float64)
    results = {}
    for policy in ("none", "block_keep_attn", "block"):
        torch.manual_seed(5)
        results[policy] = run(FusedCheckpointBlock.from_block(copy.deepcopy(blk), policy).train(), x, g)
    for policy in ("block_keep_attn", "block"):
        for a, r in zip(results[policy], results["none"]):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_second_backward_with_retained_graph_is_unchanged():
    """No backward kernel writes into a saved tensor (Liger #370): a second backward gives the same grads."""
    blk = llama_block(dtype=torch.float32)
    pe = rope_tables(2, 7, blk.head_dim, torch.float32)
    for policy in POLICIES:
        fused = FusedCheckpointBlock.from_block(copy.deepcopy(blk), policy)
        x = torch.randn(2, 7, 72, requires_grad=True)
        out = fused(x, position_embeddings=pe)
        g1 = torch.autograd.grad(out.sum(), [x, *fused.parameters()], retain_graph=True)
        g2 = torch.autograd.grad(out.sum(), [x, *fused.parameters()])
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_double_backward_refused():
    """create_graph=True must not silently give wrong second-order gradients: it raises, on every policy."""
    blk = TransformerBlock(16, 2).double()
    for policy in POLICIES:
        x = torch.randn(1, 3, 16, dtype=torch.float64, requires_grad=True)
        out = FusedCheckpointBlock.from_block(blk, policy)(x)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(out.sum(), x, create_graph=True)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="n_kv_heads"):
        TransformerBlock(64, 8, activation="swiglu", n_kv_heads=3)
    with pytest.raises(TypeError, match="d_model"):
        TransformerBlock(64.0, 8)
    with pytest.raises(ValueError, match="mlp_ratio"):
        TransformerBlock(64, 8, mlp_ratio=0)
    with pytest.raises(ValueError, match="norm"):  # any norm pairs with any MLP form now (tests/test_block_spec.py)
        TransformerBlock(64, 8, activation="swiglu", norm="batchnorm")
    blk = FusedCheckpointBlock(64, 8, activation="swiglu", n_kv_heads=2)
    x = torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match="position_embeddings cos"):
        blk(x, position_embeddings=rope_tables(2, 6, 8, torch.float32))
    with pytest.raises(ValueError, match="x of shape"):
        blk(torch.randn(2, 5, 63), position_embeddings=rope_tables(2, 5, 8, torch.float32))
    with pytest.raises(ValueError, match="attn_mask"):
        blk(x, attn_mask=torch.ones(2, 8, 5, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        blk(x, attn_mask=torch.ones(2, 1, 5, 5, dtype=torch.long))


def test_empty_batch_and_head_dim_one_and_meta():
    """B=0 / T=0 give empty outputs and zero grads like the plain block; head_dim 1 works; meta runs fwd + bwd."""
    for b, t in ((0, 5), (2, 0)):
        blk = TransformerBlock(8, 2)
        x = torch.randn(b, t, 8, requires_grad=True)
        out = FusedCheckpointBlock.from_block(blk, "block")(x)
        out.sum().backward()
        assert out.shape == (b, t, 8) and all(p.grad is not None and not p.grad.any() for p in blk.parameters())
    blk = TransformerBlock(8, 8).double()
    x, g = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 5) > 0.2
    mask[..., 0] = True
    ref = run(blk, x, g, attn_mask=mask)
    for backend in ("reference", "cpp"):
        with ckpt_ext.set_backend(backend):
            got = run(FusedCheckpointBlock.from_block(copy.deepcopy(blk), "ffn"), x, g, attn_mask=mask)
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r)
    meta = FusedCheckpointBlock(16, 2, policy="block").to("meta")
    out = meta(torch.randn(2, 3, 16, device="meta", requires_grad=True))
    out.sum().backward()
    assert out.device.type == "meta" and meta.mlp.fc.weight.grad.shape == (64, 16)
