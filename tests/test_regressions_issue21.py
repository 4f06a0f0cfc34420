"""Regression tests for issue 21, the block core (items 1, 2, 3, 7, 8, 10; item 11 is in test_memory_flops.py).

Each test here fails on c503ee1 (except the mask/ids check of item 1, which pins that it stays true):
1. traced programs replayed for the wrong call (the traced executor is removed since issue 23; what stays is that
   masks and segment ids of one shape but other values each give their own result);
2. dropout p set on the module's nn.Dropout ignored by the fused block;
3. a mask (or RoPE table) that requires grad silently got no gradient;
7. an outer autocast around backward leaked into the backward of a block run without autocast;
8. numpy scalar hyperparameters broke the compiled block's spec round trip;
10. torch.func transforms failed with torch's generic setup_context error.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_llama_block import rope_tables

import ckpt_ext
from ckpt_ext import FusedCheckpointBlock, TransformerBlock
from ckpt_ext.compiled import _parse_spec, make_spec
from ckpt_ext.spec import BlockConfig, BlockSpec

from helpers import make_block, run_step

POLICIES = ("none", "pointwise", "ffn", "block_keep_attn", "block")
BACKENDS = ("reference", "cpp")


# ------------------------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("policy", ["none", "block"])
def test_masks_and_ids_of_one_shape_are_exact(policy):
    """Two masks (or id tensors) of the same shape but different values, each called three times on one module on the
    cpp fast path: every call gives the plain block's result (nothing is keyed by shape alone)."""
    torch.manual_seed(0)
    plain = make_block(24, 4)
    fused = FusedCheckpointBlock.from_block(copy.deepcopy(plain), policy)
    x, g = torch.randn(2, 6, 24), torch.randn(2, 6, 24)
    lengths = torch.tensor([[6, 3], [2, 5]])  # right padding: two masks of one shape, other values
    masks = [(torch.arange(6) < n[:, None])[:, None, None, :] for n in lengths]  # (B, 1, 1, T) keep-masks
    ids = [torch.tensor([[1, 1, 1, 2, 2, 2], [1, 1, 2, 2, 3, 3]]),
           torch.tensor([[1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 2, 2]])]  # fmt: skip
    cases = [dict(attn_mask=m) for m in masks] + [dict(segment_ids=i) for i in ids]
    with ckpt_ext.set_backend("cpp"):
        results = [[run_step(fused, x, g * _real_rows(kw), **kw) for kw in cases] for _ in range(3)]
    for kw, *calls in zip(cases, *results):
        want = run_step(plain, x, g * _real_rows(kw), **kw)
        for ours in calls:
            ours[0], want[0] = ours[0] * _real_rows(kw), want[0] * _real_rows(kw)
            for a, w in zip(ours, want):
                torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)
    assert not torch.equal(results[0][0][0], results[0][1][0]) and not torch.equal(results[0][2][0], results[0][3][0])


def _real_rows(kw) -> torch.Tensor:
    """(B, T, 1): 1 on rows with a defined output, 0 on padding rows (segment id 0)."""
    ids = kw.get("segment_ids")
    return torch.ones(2, 6, 1) if ids is None else (ids != 0)[..., None].float()


# ------------------------------------------------------------------------------------------------------- item 2
def _seeded_step(module, x, g, seed=7):
    torch.manual_seed(seed)
    return run_step(module, x, g)


def test_dropout_set_on_the_modules_reaches_the_fused_block():
    """A dropout schedule that sets p on every nn.Dropout: the fused block (from_block shares the modules) draws
    exactly what a fused block built with that p draws, and config() reports it."""
    plain = make_block(24, 4)
    fused = FusedCheckpointBlock.from_block(plain, "block").train()
    for m in plain.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    assert fused.dropout == 0.3 and fused.attn_dropout == 0.3
    assert fused.config()["dropout"] == 0.3 and fused.config()["attn_dropout"] == 0.3
    built = FusedCheckpointBlock.from_block(make_block(24, 4, dropout=0.3, attn_dropout=0.3), "block").train()
    x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    ours, want = _seeded_step(fused, x, g), _seeded_step(built, x, g)
    for a, w in zip(ours, want):
        assert torch.equal(a, w)
    assert not torch.equal(ours[0], fused.eval()(x)), "training output equals eval: dropout was ignored"


@pytest.mark.parametrize("which", ["resid_drop", "attn.attn_drop"])
def test_each_dropout_module_is_the_single_source(which):
    """Setting one module's p changes the plain and the fused block alike (and only that dropout); the attribute
    setter writes the module."""
    blk = make_block(24, 4).train()
    fused = FusedCheckpointBlock.from_block(blk, "ffn")
    module = blk.get_submodule(which)
    x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    quiet = _seeded_step(fused, x, g)
    module.p = 0.5
    for m in (blk, fused):
        assert not torch.equal(_seeded_step(m, x, g)[0], quiet[0]), f"{type(m).__name__} ignored {which}.p"
    module.eval()  # its training flag counts as the plain block's does
    assert torch.equal(_seeded_step(fused, x, g)[0], quiet[0])
    module.train()
    attr = "dropout" if which == "resid_drop" else "attn_dropout"
    setattr(fused, attr, 0.0)
    assert module.p == 0.0 and blk.config()[attr] == 0.0
    with pytest.raises(ValueError, match=attr):
        setattr(fused, attr, 1.0)
    module.p = 1.0  # nn.Dropout allows 1.0; the fused kernels scale by 1 / (1 - p)
    with pytest.raises(ValueError, match=which.replace(".", r"\.") + r"\.p"):
        fused(x)


def test_dropout_modules_add_nothing_to_the_state_dict():
    plain = TransformerBlock(24, 4, dropout=0.1, attn_dropout=0.2)
    keys = set(plain.state_dict())
    assert not any("drop" in k for k in keys)
    assert keys == {n for n, _ in plain.named_parameters()}
    fused = FusedCheckpointBlock(24, 4, dropout=0.1, attn_dropout=0.2)
    fused.load_state_dict(plain.state_dict())
    plain.load_state_dict(fused.state_dict())


# ------------------------------------------------------------------------------------------------------- item 3
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_a_mask_that_requires_grad_raises(backend, policy):
    blk = FusedCheckpointBlock.from_block(make_block(24, 4), policy)
    x = torch.randn(2, 5, 24, requires_grad=True)
    bias = torch.nn.Parameter(torch.zeros(1, 1, 5, 5))
    with ckpt_ext.set_backend(backend):
        for mode in (blk.train, blk.eval):
            mode()
            with pytest.raises(ValueError, match="attn_mask requires grad"):
                blk(x, attn_mask=bias)
            with pytest.raises(ValueError, match="attn_mask requires grad"):
                blk(x.detach(), attn_mask=bias)  # nothing else needs grad: the no-grad path checks too
        with torch.no_grad():  # no gradient would flow: allowed, and the mask's values are used
            out = blk(x, attn_mask=bias)
            torch.testing.assert_close(out, blk(x, attn_mask=bias.detach()), rtol=0, atol=0)


def test_rope_tables_that_require_grad_raise():
    blk = FusedCheckpointBlock(24, 4, activation="swiglu", policy="block")
    cos, sin = rope_tables(1, 5, 6, torch.float32)
    x = torch.randn(2, 5, 24, requires_grad=True)
    with pytest.raises(ValueError, match="position_embeddings cos requires grad"):
        blk(x, position_embeddings=(cos.requires_grad_(), sin))


# ------------------------------------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["none", "ffn", "block"])
def test_backward_runs_under_the_forwards_autocast_state(backend, policy):
    """fp32 forward with autocast off, backward inside an outer bf16 autocast: the fused block's backward (recompute
    included) runs in fp32 as its forward did, equal to the plain block's fp32 step. c503ee1 let the
    outer autocast in (cpp: 'dout, out and lse must be float32'; reference: bf16 gradients)."""
    plain = make_block(24, 4)
    fused = FusedCheckpointBlock.from_block(copy.deepcopy(plain), policy)
    x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 24)

    def step(module):
        xr = x.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            out = module(xr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.backward(g)
        return [out.detach(), xr.grad] + [p.grad for p in module.parameters()]

    want = run_step(plain, x, g)  # fp32 throughout
    with ckpt_ext.set_backend(backend):
        for a, w in zip(step(fused), want):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, w, rtol=1e-4, atol=2e-5)


def test_bf16_forward_backward_outside_autocast_still_runs_bf16():
    """The other direction: a forward under bf16 autocast, backward outside it, re-enters bf16 (unchanged)."""
    plain = make_block(24, 4)
    fused = FusedCheckpointBlock.from_block(copy.deepcopy(plain), "block")
    x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 24)

    def step(module):
        xr = x.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(xr)
        out.float().backward(g)
        return [xr.grad] + [p.grad for p in module.parameters()]

    for a, w in zip(step(fused), step(plain)):
        torch.testing.assert_close(a, w, rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------------------------------------------- item 8
def test_numpy_hyperparameters_become_python_numbers():
    blk = FusedCheckpointBlock(np.int64(24), np.int64(4), eps=np.float32(1e-5), dropout=np.float64(0.1),
                               attn_dropout=np.float32(0.25), mlp_ratio=np.float64(2.0),
                               causal=np.bool_(True))  # fmt: skip
    cfg = blk.config()
    for key in ("d_model", "n_heads", "d_ff", "head_dim", "n_kv_heads"):
        assert type(cfg[key]) is int, key
    for key in ("eps", "dropout", "attn_dropout"):
        assert type(cfg[key]) is float, key
    assert type(cfg["causal"]) is bool
    spec = BlockSpec(np.int64(4), np.bool_(True), np.float32(1e-5), n_kv_heads=np.int32(2), head_dim=np.int64(6))
    raw = BlockConfig(spec, "block", np.int64(3), np.float64(0.1), np.float32(0.2))
    assert type(spec.n_heads) is int and type(spec.eps) is float and type(raw.seed) is int
    assert type(spec.causal) is bool and type(spec.n_kv_heads) is int and type(spec.head_dim) is int
    assert type(raw.dropout) is float and type(raw.attn_dropout) is float
    parsed, _, _, _ = _parse_spec(make_spec(raw, "cpu"))
    assert parsed == raw.with_(seed=0)
    with pytest.raises(TypeError, match="BlockSpec.eps"):
        BlockSpec(4, True, "1e-5")
    with pytest.raises(TypeError, match="dropout"):
        TransformerBlock(24, 4, dropout="0.1")


@pytest.mark.parametrize("policy", ["ffn", "block"])
def test_numpy_hyperparameters_under_torch_compile(policy):
    torch._dynamo.reset()
    kw = dict(eps=np.float32(1e-5), dropout=np.float64(0.1), attn_dropout=np.float64(0.1))
    blk = make_block(24, 4, **kw)
    x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    torch.manual_seed(5)
    want = run_step(FusedCheckpointBlock.from_block(blk, policy), x, g)
    compiled = torch.compile(FusedCheckpointBlock.from_block(blk, policy), fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    got = run_step(compiled, x, g)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ item 10
@pytest.mark.parametrize("transform", ["grad", "vjp", "vmap", "jacrev"])
def test_torch_func_transforms_raise_a_clear_error(transform):
    blk = FusedCheckpointBlock.from_block(make_block(24, 4), "block")
    params = dict(blk.named_parameters())
    x = torch.randn(2, 5, 24)

    def loss(p, x):
        return torch.func.functional_call(blk, p, (x,)).sum()

    calls = {
        "grad": lambda: torch.func.grad(loss)(params, x),
        "vjp": lambda: torch.func.vjp(lambda x: blk(x), x),
        "vmap": lambda: torch.func.vmap(lambda x: blk(x))(x[None].expand(3, -1, -1, -1)),
        "jacrev": lambda: torch.func.jacrev(lambda x: blk(x))(x[:1, :2]),
    }
    with pytest.raises(NotImplementedError, match=r"ckpt_ext.*torch\.func.*ckpt_ext\.TransformerBlock"):
        calls[transform]()


def test_functional_call_without_a_transform_still_works():
    plain = make_block(24, 4)
    blk = FusedCheckpointBlock.from_block(copy.deepcopy(plain), "block")
    x = torch.randn(2, 5, 24)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in blk.named_parameters()}
    torch.func.functional_call(blk, params, (x,)).sum().backward()
    plain(x).sum().backward()
    for n, p in plain.named_parameters():
        torch.testing.assert_close(params[n].grad, p.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- the property lane
LANE_CASE = dict(b=2, t=4, d=8, heads=2, head_dim=None, kv=None, d_ff=7, activation="gelu", causal=True,
                 dtype="float32", mask="none", policy="block", backend="cpp", seed=3)  # fmt: skip


@pytest.mark.parametrize("extra", [dict(strided=True), dict(activation="swiglu", kv=1, strided=True)],
                         ids=["strided", "llama"])  # fmt: skip
def test_the_property_lane_finds_item_11(extra):
    """The lane's checks (tests/block_cases.py) on a strided x (retained bytes: item 11); fails on c503ee1."""
    from block_cases import check_parity

    check_parity(LANE_CASE | extra)
