"""LoRA (real PEFT adapters) on FusedCheckpointBlock's linears, against the plain TransformerBlock running PEFT's own
forward: output, dx and every LoRA A/B gradient per policy, family and target set; the base weights frozen (their
grads None); lora_dropout replays its mask (every policy gives the same step under one seed); unsupported LoRA forms
run the plain forward with a warning; no d×d GEMM for a frozen weight's LoRA update (FLOPs)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_llama_block import f64_plain
from torch.utils.flop_counter import FlopCounterMode

import ckpt_ext
from ckpt_ext import FusedCheckpointBlock, TransformerBlock, lora
from ckpt_ext.block import init_block_
from ckpt_ext.policies import POLICIES

peft = pytest.importorskip("peft")

FAMILIES = {
    "gpt2": dict(activation="gelu_tanh"),
    "llama": dict(activation="swiglu", n_kv_heads=2),
}
TARGETS = {
    "gpt2": {"attn": ["qkv"], "all": ["qkv", "proj", "fc", "attn.proj", "mlp.proj"]},
    "llama": {"attn": ["attn.q", "attn.v"], "all": ["attn.q", "attn.k", "attn.v", "attn.proj", "gate", "up",
                                                     "mlp.proj"]},
}  # fmt: skip


def _adapted(family: str, targets: str, *, dropout=0.0, rank=3, d=24, seed=0, use_rslora=False, use_dora=False):
    """A plain block with PEFT LoRA injected (random B so every gradient is non-trivial), base weights frozen."""
    torch.manual_seed(seed)
    blk = TransformerBlock(d, 4, **FAMILIES[family])
    init_block_(blk, std=0.2)
    with torch.no_grad():  # non-trivial norm weights
        for ln in (blk.ln_1, blk.ln_2):
            ln.weight.add_(0.1 * torch.randn_like(ln.weight))
    names = TARGETS[family][targets]
    cfg = peft.LoraConfig(r=rank, lora_alpha=5, lora_dropout=dropout, target_modules=names, use_rslora=use_rslora,
                           use_dora=use_dora)  # fmt: skip
    holder = torch.nn.Module()  # PEFT reads ``model.config``: TransformerBlock.config is a method, so wrap it
    holder.blk = blk
    blk = peft.inject_adapter_in_model(cfg, holder).blk
    torch.manual_seed(seed + 1)
    for name, p in blk.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.normal_(0.0, 0.3)
        else:
            p.requires_grad_(False)
    return blk


def _step(module, x, dout, **kwargs):
    x = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x, **kwargs)
    out.backward(dout)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}
    return out.detach(), x.grad, grads


def _compare(plain, fused, x, dout, atol, rtol, **kwargs):
    want = _step(plain, x, dout, **kwargs)
    got = _step(fused, x, dout, **kwargs)
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=rtol, msg=lambda m: f"out: {m}")
    torch.testing.assert_close(got[1], want[1], atol=atol, rtol=rtol, msg=lambda m: f"dx: {m}")
    assert got[2].keys() == want[2].keys()
    for name, g in want[2].items():
        if "lora_" not in name:
            assert got[2][name] is None, f"frozen {name} got a gradient"
            continue
        assert g is not None and got[2][name] is not None, name
        torch.testing.assert_close(got[2][name], g, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("targets", ["attn", "all"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_matches_peft_float64(family, targets, policy, backend):
    plain = _adapted(family, targets).double()
    fused = FusedCheckpointBlock.from_block(copy.deepcopy(plain), policy=policy)
    plain = f64_plain(plain)
    b, t = 3, 7
    x = torch.randn(b, t, 24, dtype=torch.float64)
    dout = torch.randn_like(x)
    kwargs = {}
    if family == "llama":
        ang = torch.randn(1, t, 3, dtype=torch.float64)
        kwargs["position_embeddings"] = (torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1))
    with ckpt_ext.set_backend(backend):
        _compare(plain, fused, x, dout, atol=1e-10, rtol=1e-9, **kwargs)


def _assert_within_torch_error(ours, torch_same, ref64, factor=4.0, atol=1e-5):
    """Tolerance rule: |ours - ref64| <= factor x |torch's same-dtype step - ref64| + atol, per tensor."""
    pairs = [("out", ours[0], torch_same[0], ref64[0]), ("dx", ours[1], torch_same[1], ref64[1])]
    pairs += [(n, ours[2][n], torch_same[2][n], g) for n, g in ref64[2].items() if g is not None]
    for name, a, b, r in pairs:
        err = (b.double() - r).abs().max().item()
        torch.testing.assert_close(a.double(), r, rtol=0, atol=factor * err + atol, msg=lambda m, n=name: f"{n} {m}")


@pytest.mark.parametrize("policy", ["pointwise", "block"])
def test_lora_fp32_rslora_segments(policy):
    plain = _adapted("llama", "all", use_rslora=True)
    fused = FusedCheckpointBlock.from_block(copy.deepcopy(plain), policy=policy)
    ref = f64_plain(copy.deepcopy(plain).double())
    x = torch.randn(2, 9, 24)
    ids = torch.tensor([[1, 1, 2, 2, 2, 2, 2, 2, 2], [1, 1, 1, 1, 2, 2, 2, 2, 2]])  # two packed sequences a row
    ang = torch.randn(1, 9, 3)
    pe = (torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1))
    dout = torch.randn_like(x)
    want = _step(ref, x.double(), dout.double(), position_embeddings=tuple(c.double() for c in pe), segment_ids=ids)
    torch32 = _step(plain, x, dout, position_embeddings=pe, segment_ids=ids)
    ours = _step(fused, x, dout, position_embeddings=pe, segment_ids=ids)
    _assert_within_torch_error(ours, torch32, want)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_dropout_replayed_by_every_policy(family):
    """One seed, lora_dropout 0.3 on every linear (and the block's dropouts): every policy and both backends give the
    same step (the mask is replayed, not redrawn), and the step differs from the dropout-free one."""
    extra = dict(dropout=0.1, attn_dropout=0.1)
    base = _adapted(family, "all", dropout=0.3)
    results = []
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    dout = torch.randn_like(x)
    kwargs = {}
    if family == "llama":
        ang = torch.randn(1, 5, 3, dtype=torch.float64)
        kwargs["position_embeddings"] = (torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1))
    for policy in POLICIES:
        for backend in ("reference", "cpp"):
            blk = copy.deepcopy(base).double()
            blk.resid_drop.p, blk.attn.attn_drop.p = extra["dropout"], extra["attn_dropout"]
            fused = FusedCheckpointBlock.from_block(blk, policy=policy)
            torch.manual_seed(123)
            with ckpt_ext.set_backend(backend):
                results.append(_step(fused, x, dout, **kwargs))
    first = results[0]
    for r in results[1:]:
        torch.testing.assert_close(r[0], first[0], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(r[1], first[1], atol=1e-10, rtol=1e-9)
        for name, g in first[2].items():
            if g is not None:
                torch.testing.assert_close(r[2][name], g, atol=1e-10, rtol=1e-9)
    eval_blk = FusedCheckpointBlock.from_block(copy.deepcopy(base).double(), policy="block")
    for m in eval_blk.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    no_drop = _step(eval_blk, x, dout, **kwargs)
    assert not torch.allclose(no_drop[0], first[0])


def test_lora_dropout_matches_hash_mask_reference():
    """lora_dropout's mask is the hash mask of the target's seed: PEFT's forward with the same mask (a dropout module
    replaced by the hash mask) gives the same step."""
    plain = _adapted("gpt2", "attn", dropout=0.25).double()
    fused = FusedCheckpointBlock.from_block(copy.deepcopy(plain), policy="block")
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    dout = torch.randn_like(x)
    torch.manual_seed(7)
    got = _step(fused, x, dout)
    torch.manual_seed(7)
    seed = ckpt_ext.seeds.host_seed()
    spec = lora.LoraSpec("qkv", 3, 5 / 3, 0.25)

    class HashDropout(torch.nn.Module):
        def forward(self, y):
            return ckpt_ext.reference.dropout_add(y.reshape(-1, y.shape[-1]), None, 0.25, spec.seed(seed)).view_as(y)

    plain.attn.qkv.lora_dropout["default"] = HashDropout()
    want = _step(plain, x, dout)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for name, g in want[2].items():
        if g is not None:
            torch.testing.assert_close(got[2][name], g)


def test_unsupported_lora_forms_run_the_plain_forward_with_a_warning():
    dora = _adapted("gpt2", "attn", use_dora=True)
    fused = FusedCheckpointBlock.from_block(copy.deepcopy(dora), policy="block")
    x = torch.randn(2, 5, 24)
    with pytest.warns(UserWarning, match="LoRA variant"):
        out = fused(x)
    torch.testing.assert_close(out, dora(x))
    plain = _adapted("gpt2", "attn")
    hooked = FusedCheckpointBlock.from_block(copy.deepcopy(plain), policy="block")
    hooked.mlp.fc.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.warns(UserWarning, match="forward hooks"):
        out = hooked(x)
    ref = copy.deepcopy(plain)
    ref.mlp.fc.register_forward_hook(lambda m, i, o: o * 2)
    torch.testing.assert_close(out, ref(x))


def test_disabled_and_merged_adapters():
    plain = _adapted("llama", "all")
    fused = FusedCheckpointBlock.from_block(copy.deepcopy(plain), policy="block")
    x = torch.randn(2, 5, 24)
    ang = torch.randn(1, 5, 3)
    pe = (torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1))
    for blk in (plain, fused):
        for m in blk.modules():
            if lora.is_lora_layer(m):
                m.enable_adapters(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fused(x, position_embeddings=pe), plain(x, position_embeddings=pe))
    for blk in (plain, fused):
        for m in blk.modules():
            if lora.is_lora_layer(m):
                m.enable_adapters(True)
                m.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fused(x, position_embeddings=pe), plain(x, position_embeddings=pe))


def test_frozen_base_lora_step_flops_stay_low_rank():
    """With the base frozen, the fused step's FLOPs must not include any dW GEMM of a base weight (d x d): at most the
    unconverted PEFT step's FLOPs plus the policy's recompute."""
    plain = _adapted("llama", "all", d=64, rank=4)
    x = torch.randn(2, 32, 64)
    ang = torch.randn(1, 32, 8)
    pe = (torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1))

    eager = matmul_flops(lambda: _step(plain, x, torch.randn_like(x), position_embeddings=pe))
    fused = FusedCheckpointBlock.from_block(copy.deepcopy(plain), policy="none")
    fused_none = matmul_flops(lambda: _step(fused, x, torch.randn_like(x), position_embeddings=pe))
    assert fused_none <= eager * 1.03, (fused_none, eager)  # + LoRA's z = drop(y)Aᵀ recomputed for dB (N·in·r)


def matmul_flops(fn) -> int:
    """FLOPs of ``fn`` without the attention core (torch's CPU SDPA has no FLOP formula; ours does): what the
    projections, their LoRA updates and their gradients cost."""
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if "attention" not in str(op))


@pytest.mark.parametrize("policy", ["pointwise", "block"])
def test_bf16_model_with_fp32_adapters(policy):
    """A bf16 base with fp32 LoRA matrices and no autocast (PEFT keeps adapters in fp32 and casts the input to them):
    the update is computed in fp32 and rounded into the bf16 output; within the tolerance rule of PEFT's own bf16
    step against the float64 one."""
    plain = _adapted("llama", "all")
    for name, p in plain.named_parameters():
        if "lora_" not in name:
            p.data = p.data.bfloat16()
    fused = FusedCheckpointBlock.from_block(copy.deepcopy(plain), policy=policy)
    ref = f64_plain(copy.deepcopy(plain).double())
    x = torch.randn(2, 7, 24)
    ang = torch.randn(1, 7, 3)
    pe = (torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1))
    dout = torch.randn_like(x)
    want = _step(ref, x.double(), dout.double(), position_embeddings=tuple(c.double() for c in pe))
    theirs = _step(plain, x.bfloat16(), dout.bfloat16(), position_embeddings=tuple(c.bfloat16() for c in pe))
    ours = _step(fused, x.bfloat16(), dout.bfloat16(), position_embeddings=tuple(c.bfloat16() for c in pe))
    assert ours[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for n, g in ours[2].items() if g is not None)
    _assert_within_torch_error(ours, theirs, want, atol=1e-2)
