"""ModernBERT through apply_fused_checkpointing (integrations/hf_modernbert.py), CPU, tiny config with T = 160 >
local_attention = 16 so local (window 8) and global layers differ: loss and every parameter gradient against the
unconverted model × policy × (no padding, right padding), fp32, dropout 0, with and without norm/attention/MLP
biases; the fused path ran on every layer; fallbacks warn (gelu activation, long padding leaving rows no key)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ModernBertConfig, ModernBertForMaskedLM, ModernBertForSequenceClassification  # noqa: E402

from ckpt_ext.integrations.huggingface import apply_fused_checkpointing  # noqa: E402
from ckpt_ext.policies import POLICIES  # noqa: E402

T, B = 160, 2


def config(bias: bool, impl: str = "eager", act: str = "gelu_pytorch_tanh") -> ModernBertConfig:
    return ModernBertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                            num_attention_heads=4, local_attention=16, global_attn_every_n_layers=3,
                            hidden_activation=act, norm_bias=bias, attention_bias=bias, mlp_bias=bias,
                            attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0, pad_token_id=0,
                            max_position_embeddings=256, attn_implementation=impl, reference_compile=False)  # fmt: skip


def batch(pad: int):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        mask[1, T - pad :] = 0
        ids[1, T - pad :] = 0
    labels = torch.where(mask.bool(), ids, -100)
    return ids, mask, labels


def grads(model, ids, mask, labels):
    model.zero_grad()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_masked_lm_matches_unconverted(policy, bias, pad, impl, fused_calls):
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(config(bias, impl)).train()
    fused = copy.deepcopy(model)
    assert apply_fused_checkpointing(fused, policy) == 4
    batch_ = batch(pad)
    loss, g = grads(model, *batch_)
    floss, fg = grads(fused, *batch_)
    assert len(fused_calls) == 4
    torch.testing.assert_close(floss, loss, atol=1e-5, rtol=1e-5)
    assert fg.keys() == g.keys()
    for name in g:
        torch.testing.assert_close(fg[name], g[name], atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_sequence_classification_matches(fused_calls):
    torch.manual_seed(0)
    model = ModernBertForSequenceClassification(config(True)).train()
    fused = copy.deepcopy(model)
    apply_fused_checkpointing(fused, "block")
    ids, mask, _ = batch(5)
    labels = torch.tensor([0, 1])
    loss, g = grads(model, ids, mask, labels)
    floss, fg = grads(fused, ids, mask, labels)
    assert len(fused_calls) == 4
    torch.testing.assert_close(floss, loss, atol=1e-5, rtol=1e-5)
    for name in g:
        torch.testing.assert_close(fg[name], g[name], atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("act, pad", [("gelu", 0), ("gelu_pytorch_tanh", 40)])
def test_unhandled_cases_fall_back_exactly_with_a_warning(act, pad, fused_calls, caplog):
    """erf GELU (not the fused GeGLU's tanh form); right padding longer than the window (padded rows see no key)."""
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(config(False, act=act)).train()
    fused = copy.deepcopy(model)
    apply_fused_checkpointing(fused, "ffn")
    batch_ = batch(pad)
    loss, g = grads(model, *batch_)
    from ckpt_ext.integrations import hf_common

    hf_common._WARNED.clear()
    with caplog.at_level(logging.WARNING):
        floss, fg = grads(fused, *batch_)
    assert "runs its original forward" in caplog.text
    torch.testing.assert_close(floss, loss, atol=1e-6, rtol=1e-6)
    for name in g:
        torch.testing.assert_close(fg[name], g[name], atol=1e-6, rtol=1e-6)
    assert len(fused_calls) < 4
