"""The block spec's forms: any norm × any MLP form × pre/post placement runs through the one op graph.

Each form of the fused block (FusedCheckpointBlock, every policy, reference and C++ backends) against the plain
TransformerBlock of the same form in float64; post-LN's retained bytes against its policy table; the save layout
against what the forward really keeps; bad spec fields raise naming the field.
"""

import copy
import dataclasses

import pytest
import torch

import ckpt_ext
from ckpt_ext import FusedCheckpointBlock, TransformerBlock, policies, retained_bytes
from ckpt_ext.block import fused_block, init_block_
from ckpt_ext.measure import retained_activation_bytes
from ckpt_ext.save_layout import save_layout
from ckpt_ext.spec import BlockConfig, BlockSpec

from helpers import make_block, run_step

FORMS = [  # (norm, activation, placement): the two historical pairs, the crossed ones, post-LN (BERT)
    ("layernorm", "gelu", "pre"),
    ("rmsnorm", "swiglu", "pre"),
    ("layernorm", "swiglu", "pre"),
    ("rmsnorm", "gelu_tanh", "pre"),
    ("layernorm", "gelu", "post"),
    ("layernorm", "gelu_tanh", "post"),
    ("rmsnorm", "swiglu", "post"),
    ("layernorm", "geglu", "pre"),
    ("rmsnorm", "geglu", "pre"),
    ("layernorm", "geglu_erf", "pre"),
]
POLICIES = list(policies.POLICIES)


def _block(norm, activation, placement, d=72, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    blk = TransformerBlock(d, 4, norm=norm, activation=activation, norm_placement=placement, **kw)
    init_block_(blk, std=0.2)
    with torch.no_grad():  # norm weights start at one, biases at zero: move them so their gradients are exercised
        for p in blk.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return blk.to(dtype)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", FORMS, ids=["-".join(f) for f in FORMS])
def test_every_form_matches_the_plain_block_in_float64(form, causal, backend):
    blk = _block(*form, causal=causal)
    x = torch.randn(3, 7, 72, dtype=torch.float64)
    grad = torch.randn_like(x)
    want = run_step(blk, x, grad)
    # RMSNorm follows Hugging Face's cast order (x.float(): fp32 even for a float64 x), so those forms agree to fp32
    tol = dict(rtol=1e-5, atol=1e-6) if form[0] == "layernorm" else dict(rtol=2e-4, atol=2e-5)
    with ckpt_ext.set_backend(backend):
        for policy in POLICIES:
            got = run_step(FusedCheckpointBlock.from_block(blk, policy), x, grad)
            for name, a, b in zip(["out", "dx", *dict(blk.named_parameters())], got, want):
                torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name, p=policy: f"{p} {n}: {m}")


@pytest.mark.parametrize("policy", POLICIES)
def test_post_ln_retained_bytes_match_its_table(policy):
    b, t, d, heads = 2, 64, 128, 4
    blk = make_block(d, heads, norm_placement="post", causal=False)
    x = torch.randn(b, t, d, requires_grad=True)
    kept, _ = retained_activation_bytes(FusedCheckpointBlock.from_block(blk, policy), x)
    assert kept == retained_bytes(policy, b, t, d, heads, 4 * d, placement="post", ln2_from_out=True)
    eager_kept, _ = retained_activation_bytes(blk, x)
    assert kept <= eager_kept if policy == "none" else kept < eager_kept


def test_post_ln_table_rebuilds_what_pre_ln_rebuilds():
    """Each post-LN policy keeps no more than the one before it, and block keeps only statistics plus h2."""
    sizes = dict(batch=4, seq=128, d_model=256, n_heads=4, hidden=1024, placement="post")
    kept = [retained_bytes(p, **sizes) for p in POLICIES]
    assert kept == sorted(kept, reverse=True)
    assert set(policies.POST_LN_POLICIES["block"].keeps) == {"x", "ln1_stats", "h2", "ln2_stats"}


@pytest.mark.parametrize("form", FORMS, ids=["-".join(f) for f in FORMS])
@pytest.mark.parametrize("rope", [False, True])
def test_save_layout_is_what_the_forward_keeps(form, rope):
    """save_layout's counts equal the tensors the fused forward saves (the Function's saved list, minus the fixed
    inputs), for every policy."""
    norm, activation, placement = form
    blk = _block(norm, activation, placement, dtype=torch.float32)
    x = torch.randn(2, 5, 72, requires_grad=True)
    pe = None
    if rope:
        cos, sin = torch.randn(1, 5, 18), torch.randn(1, 5, 18)
        pe = (cos, sin)
    for policy in POLICIES:
        fused = FusedCheckpointBlock.from_block(blk, policy)
        out = fused(x, position_embeddings=pe)
        n_params = len(fused.block_config().spec.param_names())
        saved = out.grad_fn.saved_tensors  # attn_mask, segment_ids, cos, sin, params, x, *saved
        layout = save_layout(fused.spec(), policy, rope)
        assert len(saved) - 4 - n_params - 1 == sum(count for _, count in layout), (policy, layout)


def test_bad_spec_fields_raise_naming_the_field():
    for field, value in (("norm", "batchnorm"), ("mlp", "relu"), ("placement", "sandwich")):
        with pytest.raises(ValueError, match=f"BlockSpec.{field}"):
            BlockSpec(4, **{field: value}).check()
    with pytest.raises(ValueError, match="n_kv_heads"):
        BlockSpec(4, n_kv_heads=3).check()
    with pytest.raises(TypeError, match="BlockConfig.spec"):
        BlockConfig("gpt2", "block")
    with pytest.raises(ValueError, match="norm_placement"):
        TransformerBlock(72, 4, norm_placement="middle")
    with pytest.raises(ValueError, match="unknown norm"):
        TransformerBlock(72, 4, norm="batchnorm")


def test_parameter_list_follows_the_spec():
    assert BlockSpec(4).param_names()[:2] == ("ln1_w", "ln1_b")
    names = BlockSpec(4, norm="rmsnorm", mlp="geglu", packed_qkv=False).param_names()
    assert "ln1_b" not in names and {"w_gate", "w_up", "w_q"} <= set(names) and "w_fc" not in names
    assert "ln1_b" not in BlockSpec(4, norm_bias=False).param_names()


def test_post_ln_under_torch_compile_matches_eager():
    blk = _block("layernorm", "gelu", "post", dtype=torch.float32)
    fused = FusedCheckpointBlock.from_block(blk, "block")
    x = torch.randn(2, 9, 72)
    grad = torch.randn_like(x)
    want = run_step(fused, x, grad)
    torch._dynamo.reset()
    got = run_step(torch.compile(fused, fullgraph=True), x, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # compiled keeps h2; eager rebuilds x̂2 from out


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_pre_ln_without_attention_norm(backend):
    """attn_norm=False (ModernBERT's first layer): q/k/v read x itself; equals the plain block with ln_1 = Identity,
    every policy, and keeps no norm1 statistics."""
    blk = _block("layernorm", "geglu", "pre", causal=False)
    plain = copy.deepcopy(blk)
    plain.ln_1 = torch.nn.Identity()
    x = torch.randn(3, 7, 72, dtype=torch.float64)
    grad = torch.randn_like(x)
    want = run_step(plain, x, grad)
    spec = dataclasses.replace(blk.spec(), attn_norm=False)
    params = {
        n: t for n, t in FusedCheckpointBlock.from_block(blk).parameter_tensors().items() if n in spec.param_names()
    }
    with ckpt_ext.set_backend(backend):
        for policy in POLICIES:
            xg = x.clone().requires_grad_(True)
            blk.zero_grad(set_to_none=True)
            out = fused_block(xg, params, BlockConfig(spec, policy))
            out.backward(grad)
            got = [out.detach(), xg.grad] + [p.grad for n, p in blk.named_parameters() if not n.startswith("ln_1")]
            assert len(got) == len(want)
            for name, a, b in zip(["out", "dx", *dict(plain.named_parameters())], got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name, p=policy: f"{p} {n}: {m}")
            assert not any(name.startswith("ln1") for name, _ in save_layout(spec, policy, False))
    stats_bytes = 2 * (2 * 8) * 4  # LayerNorm mean and rstd of 2 x 8 tokens, fp32
    assert retained_bytes("block", 2, 8, 72, 4, 288, attn_norm=False) == retained_bytes("block", 2, 8, 72, 4, 288) - (
        stats_bytes
    )


@pytest.mark.parametrize("policy", ["none", "ffn", "block"])
@pytest.mark.parametrize(
    "form", [("layernorm", "gelu", "post"), ("layernorm", "geglu_erf", "pre")], ids=["bert", "modernbert"]
)
def test_dropout_blocks_gradcheck_float64(form, policy):
    """The encoder forms with attention-probability and hidden dropout 0.1: with a fixed seed the fused block is a
    deterministic function (every mask replays from the seed, in forward and in backward's recompute), so gradcheck
    checks the hand-assembled backward, x and every parameter, against finite differences; key ids (an encoder's
    right padding) on."""
    blk = _block(*form, d=16, causal=False)
    spec = blk.spec()
    blk16 = FusedCheckpointBlock.from_block(blk).parameter_tensors()
    names = [n for n in spec.param_names() if blk16.get(n) is not None]
    leaves = [blk16[n].detach().clone().requires_grad_(True) for n in names]
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    ids = ckpt_ext.segments.from_key_mask(torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    cfg = BlockConfig(spec, policy, seed=1234, attn_dropout=0.1, dropout=0.1)

    def f(x, *tensors):
        return fused_block(x, dict(zip(names, tensors)), cfg, None, None, ids)

    once, again = f(x, *leaves), f(x, *leaves)
    torch.testing.assert_close(once, again, rtol=0, atol=0)  # the seed replays every mask
    assert not torch.allclose(once, fused_block(x, dict(zip(names, leaves)), dataclasses.replace(cfg, seed=99),
                                                None, None, ids))  # fmt: skip
    assert torch.autograd.gradcheck(f, (x, *leaves), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["geglu", "swiglu"])
def test_gated_ops_gradcheck_and_opcheck(name):
    """The gated pointwise ops (one definition, ops/gated.py): float64 gradcheck of the hand-written backward and
    torch.library.opcheck of both ops, on the graph ops as registered."""
    fwd, bwd = getattr(ckpt_ext.ops, f"{name}_fwd"), getattr(ckpt_ext.ops, f"{name}_bwd")
    g = torch.randn(7, 33, dtype=torch.float64, requires_grad=True)
    u = torch.randn(7, 33, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fwd, (g, u))
    torch.library.opcheck(fwd, (g.detach(), u.detach()))
    torch.library.opcheck(bwd, (torch.randn(7, 33, dtype=torch.float64), g.detach(), u.detach()))


@pytest.mark.parametrize("policy", POLICIES)
def test_geglu_block_runs_the_cpp_geglu_kernels(policy):
    """Under the cpp backend a GeGLU block's forward and backward run the C++ kernel ops (not the reference math)."""
    blk = _block("rmsnorm", "geglu", "pre", dtype=torch.float32)
    x = torch.randn(3, 7, 72, requires_grad=True)
    with ckpt_ext.set_backend("cpp"):
        fused = FusedCheckpointBlock.from_block(blk, policy)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fused(x).sum().backward()
    ran = {e.key for e in prof.key_averages()}
    assert {"ckpt_ext::geglu_fwd_kernel", "ckpt_ext::geglu_bwd_kernel"} <= ran
