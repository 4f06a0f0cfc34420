"""FusedCheckpointBlock == TransformerBlock: output, dx and every parameter gradient, for every policy, both GELU forms,
causal and not, awkward shapes, against a float64 reference within a few times PyTorch's own fp32 error."""

import copy

import pytest
import torch
from test_llama_block import rope_tables

import ckpt_ext
from ckpt_ext import FusedCheckpointBlock, TransformerBlock
from ckpt_ext.block import init_block_

from helpers import assert_within_torch_error, fused_copy, make_block, run_step

POLICIES = ["none", "pointwise", "ffn", "block"]
SHAPES = [(1, 1, 72), (3, 7, 72), (1, 33, 72), (3, 33, 200), (3, 1, 200), (1, 7, 200)]


def _names(block):
    return ["out", "dx"] + [n for n, _ in block.named_parameters()]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_fp32(backend, activation, causal, shape):
    b, t, d = shape
    heads = 4 if d == 72 else 8
    blk = make_block(d, heads, activation=activation, causal=causal)
    blk64 = copy.deepcopy(blk).double()
    x = torch.randn(b, t, d)
    grad = torch.randn(b, t, d)
    ref = run_step(blk64, x.double(), grad.double())
    pt = run_step(blk, x, grad)
    with ckpt_ext.set_backend(backend):
        for policy in POLICIES:
            ours = run_step(fused_copy(blk, policy), x, grad)
            assert_within_torch_error(ours, pt, ref, names=_names(blk))


@pytest.mark.parametrize("policy", POLICIES)
def test_parity_float64_exact(policy):
    """In float64 the reference backend reproduces TransformerBlock to rounding: the backward math is exact."""
    blk = make_block(72, 4).double()
    x = torch.randn(3, 7, 72, dtype=torch.float64)
    grad = torch.randn_like(x)
    ref = run_step(blk, x, grad)
    with ckpt_ext.set_backend("reference"):
        ours = run_step(fused_copy(blk, policy), x, grad)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("policy", POLICIES)
def test_no_bias_block(policy):
    blk = make_block(72, 4, bias=False)
    blk64 = copy.deepcopy(blk).double()
    x, grad = torch.randn(2, 7, 72), torch.randn(2, 7, 72)
    assert_within_torch_error(run_step(fused_copy(blk, policy), x, grad), run_step(blk, x, grad),
                              run_step(blk64, x.double(), grad.double()))  # fmt: skip


@pytest.mark.parametrize("policy", POLICIES)
def test_attn_mask_matches_transformer_block(policy):
    """A padding mask (additive, broadcast over heads and queries) combined with causal masking."""
    blk = make_block(72, 4)
    blk64 = copy.deepcopy(blk).double()
    x, grad = torch.randn(2, 9, 72), torch.randn(2, 9, 72)
    mask = torch.zeros(2, 1, 1, 9)
    mask[1, ..., 6:] = float("-inf")
    ref = run_step(blk64, x.double(), grad.double(), attn_mask=mask.double())
    pt = run_step(blk, x, grad, attn_mask=mask)
    ours = run_step(fused_copy(blk, policy), x, grad, attn_mask=mask)
    assert_within_torch_error(ours, pt, ref, names=_names(blk))


@pytest.mark.parametrize("policy", POLICIES)
def test_bf16_autocast(policy):
    """Under CPU bf16 autocast the fused block stays as close to float64 as TransformerBlock under autocast does."""
    blk = make_block(72, 4)
    blk64 = copy.deepcopy(blk).double()
    x, grad = torch.randn(3, 33, 72), torch.randn(3, 33, 72)
    ref = run_step(blk64, x.double(), grad.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pt = run_step(blk, x, grad)
        fused = fused_copy(blk, policy)
        ours = run_step(fused, x, grad)
    assert ours[0].dtype == pt[0].dtype == torch.float32
    assert_within_torch_error(ours, pt, ref, factor=4.0, atol=1e-3, names=_names(blk))


def test_policies_give_identical_results_with_dropout():
    """With dropout on, all policies draw the same masks under one seed: outputs and gradients agree."""
    blk = make_block(72, 4, dropout=0.3, attn_dropout=0.2).double()
    x, grad = torch.randn(2, 7, 72, dtype=torch.float64), torch.randn(2, 7, 72, dtype=torch.float64)
    results = {}
    for policy in POLICIES:
        torch.manual_seed(123)
        results[policy] = run_step(fused_copy(blk, policy), x, grad)
    for policy in POLICIES[1:]:
        for a, r in zip(results[policy], results["none"]):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    # and the masks really drop something: a different seed changes the output
    torch.manual_seed(124)
    other = run_step(fused_copy(blk, "block"), x, grad)
    assert not torch.allclose(other[0], results["none"][0])


def test_dropout_gradient_is_exact():
    """Dropout is part of the differentiated function: gradcheck the whole block with dropout through a fixed seed."""
    blk = make_block(8, 2, dropout=0.25, attn_dropout=0.25, mlp_ratio=2.0).double()
    fused = FusedCheckpointBlock.from_block(blk, policy="block")
    cfg = fused.block_config()
    from ckpt_ext.functional import param_names

    tensors = fused.parameter_tensors()
    params = [tensors[n].detach().clone().requires_grad_(True) for n in param_names(cfg)]
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    from ckpt_ext.block import fused_block

    with ckpt_ext.set_backend("reference"):
        assert torch.autograd.gradcheck(lambda x, *ps: fused_block(x, ps, cfg), (x, *params))


def test_bitwise_deterministic_grads():
    blk = make_block(200, 8)
    x, grad = torch.randn(3, 33, 200), torch.randn(3, 33, 200)
    for policy in POLICIES:
        first = run_step(fused_copy(blk, policy), x, grad)
        second = run_step(fused_copy(blk, policy), x, grad)
        for a, b in zip(first, second):
            assert torch.equal(a, b), policy


@pytest.mark.parametrize("policy", ["pointwise", "block"])
def test_backward_outside_autocast_replays_forward_autocast_state(policy):
    """The usual loop calls backward outside `with autocast`: recompute must still run in bf16, as the forward did."""
    blk = make_block(72, 4)
    x, grad = torch.randn(2, 9, 72), torch.randn(2, 9, 72)
    results = []
    for backward_inside in (True, False):
        fused = fused_copy(blk, policy)
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fused(xr)
            if backward_inside:
                out.backward(grad)
        if not backward_inside:
            out.backward(grad)
        results.append([xr.grad] + [p.grad for p in fused.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ frozen weights (issue 22)
FROZEN_FORMS = {"gpt2": dict(), "qwen3": dict(activation="swiglu", n_kv_heads=2, d_ff=40, qk_norm=True, qkv_bias=True)}
FROZEN_SETS = {
    "all_weights": lambda n: True,  # x alone needs a gradient (a frozen base model under LoRA)
    "matrices": lambda n: n.endswith("weight") and "ln" not in n and "norm" not in n,
    "attention": lambda n: n.startswith("attn."),
    "mlp_and_norms": lambda n: n.startswith(("mlp.", "ln_", "attn.q_norm", "attn.k_norm")),
    "all_but_ln1": lambda n: not n.startswith("ln_1."),  # x frozen below: only norm1 needs the dY1 GEMM
}


def _frozen_step(module, x, grad, frozen, x_grad: bool, **kw):
    """run_step with the parameters named by ``frozen`` frozen (requires_grad False) and x needing grad or not."""
    for n, p in module.named_parameters():
        p.requires_grad_(not frozen(n))
    xr = x.detach().requires_grad_(x_grad)
    module.zero_grad(set_to_none=True)
    out = module(xr, **kw)
    out.backward(grad)
    return [out.detach(), xr.grad] + [p.grad for _, p in module.named_parameters()]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("policy", POLICIES + ["block_keep_attn"])
@pytest.mark.parametrize("form", list(FROZEN_FORMS))
def test_frozen_weights_get_no_gradient_and_the_rest_match(form, policy, backend):
    """Any frozen subset (x needing a gradient or not): frozen weights get None (their dW / db never computed), every
    other gradient equals the plain block's."""
    torch.manual_seed(0)
    blk = TransformerBlock(24, 4, **FROZEN_FORMS[form]).double()
    init_block_(blk, std=0.3)
    with torch.no_grad():  # non-trivial norm weights and biases
        for n, p in blk.named_parameters():
            if "ln" in n or "norm" in n or n.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    kw = {"position_embeddings": rope_tables(1, 5, 6)} if form == "qwen3" else {}
    fused = fused_copy(blk, policy)
    x, grad = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 5, 24, dtype=torch.float64)
    names = _names(blk)
    with ckpt_ext.set_backend(backend):
        for set_name, frozen in FROZEN_SETS.items():
            for x_grad in (True, False):
                if set_name == "all_weights" and not x_grad:
                    continue  # nothing needs a gradient
                want = _frozen_step(blk, x, grad, frozen, x_grad, **kw)
                ours = _frozen_step(fused, x, grad, frozen, x_grad, **kw)
                for name, a, w in zip(names, ours, want):
                    what = f"{set_name}, x_grad={x_grad}: {name}"
                    assert (a is None) == (w is None), what
                    if a is not None:  # float64, but the Llama form's RMSNorm computes in fp32 (HF's order)
                        atol = (1e-9 if form == "gpt2" else 1e-5) * (1 + w.abs().max().item())
                        torch.testing.assert_close(a, w, rtol=0, atol=atol, msg=lambda m, s=what: f"{s}: {m}")
