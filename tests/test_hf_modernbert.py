"""ModernBERT through apply_fused_checkpointing (integrations/hf_modernbert.py), CPU, tiny config with T = 160 >
local_attention = 16 so local (window 8) and global layers differ: loss and every parameter gradient against the
unconverted model × policy × (no padding, right padding) × eager/sdpa, fp32, dropout 0, with and without
norm/attention/MLP biases (MaskedLM; SequenceClassification; ModernBertModel's hidden states); the fused path ran on
every layer (layer 0 without attention norm included); retained bytes per policy against policies.retained_bytes
(mlp='geglu' / 'geglu_erf'); fallbacks warn and match (a quick_gelu gate, padding that leaves local rows no key)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers  # noqa: E402  (make test installs it: missing, this file fails)
from transformers import (  # noqa: E402
    ModernBertConfig,
    ModernBertForMaskedLM,
    ModernBertForSequenceClassification,
    ModernBertModel,
)

from ckpt_ext.integrations.huggingface import apply_fused_checkpointing  # noqa: E402
from ckpt_ext.measure import retained_activation_bytes  # noqa: E402
from ckpt_ext.policies import POLICIES, retained_bytes  # noqa: E402

from helpers import assert_step_within_bf16_error

T, B = 160, 2
TF5 = int(transformers.__version__.split(".")[0]) >= 5


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
@pytest.mark.parametrize("impl, act", [("eager", "gelu"), ("sdpa", "gelu_pytorch_tanh")])
def test_masked_lm_matches_unconverted(policy, bias, pad, impl, act, fused_calls):
    """hidden_activation: ModernBERT's default erf gelu (MLP form geglu_erf) and the tanh form (geglu)."""
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(config(bias, impl, act)).train()
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


def test_padding_reaches_the_kernels_as_key_ids_and_a_window(fused_calls):
    """Right padding reaches fused_block as (B, T) int32 key ids (1 kept, -1 padded) and the local layers' window as
    BlockSpec.window; no mask tensor (global or windowed) reaches it."""
    model = ModernBertForMaskedLM(config(False)).train()
    apply_fused_checkpointing(model, "block")
    ids, mask, labels = batch(5)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    expected = torch.where(mask > 0, 1, -1).int()
    assert [call[2].spec.window for call in fused_calls] == [0, 8, 8, 0]  # every 3rd layer global, from layer 0
    for call in fused_calls:
        assert call[3] is None and call[5].dtype == torch.int32 and torch.equal(call[5], expected)


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


@pytest.mark.parametrize("act, pad, fused", [("quick_gelu", 0, 0), ("gelu_pytorch_tanh", 40, 2)])
def test_unhandled_cases_fall_back_with_a_warning(act, pad, fused, fused_calls, monkeypatch, caplog):
    """A quick_gelu gate (no fused form): every layer runs its original forward; right padding of 40 > the
    window (8): the local layers' padded rows far from every token see no key (Hugging Face: uniform weights), so the
    two local layers fall back and the two global ones fuse."""
    from ckpt_ext.integrations import hf_common

    monkeypatch.setattr(hf_common, "_WARNED", set())
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(config(False, act=act)).train()
    converted = copy.deepcopy(model)
    apply_fused_checkpointing(converted, "ffn")
    batch_ = batch(pad)
    loss, g = grads(model, *batch_)
    with caplog.at_level(logging.WARNING, logger="ckpt_ext.integrations"):
        floss, fg = grads(converted, *batch_)
    assert "runs its original forward" in caplog.text
    assert ("hidden_activation" if act == "quick_gelu" else "no key within their window") in caplog.text
    assert len(fused_calls) == fused
    exact = dict(atol=0, rtol=0) if fused == 0 else dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(floss, loss, **exact)
    for name in g:
        torch.testing.assert_close(fg[name], g[name], **exact)


def test_base_model_hidden_states_match(fused_calls):
    """ModernBertModel: last_hidden_state (padded positions included: their rows still see real tokens) and the
    gradients of a loss over every position."""
    torch.manual_seed(0)
    model = ModernBertModel(config(True)).train()
    converted = copy.deepcopy(model)
    apply_fused_checkpointing(converted, "block_keep_attn")
    ids, mask, _ = batch(5)
    outs = []
    for m in (model, converted):
        m.zero_grad()
        h = m(input_ids=ids, attention_mask=mask).last_hidden_state
        (h * torch.linspace(-1, 1, h.shape[-1])).sum().backward()
        outs.append((h.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    assert len(fused_calls) == 4
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=2e-5, rtol=1e-4)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, atol=5e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("layer_idx", [0, 1])
def test_retained_bytes_match_the_table(policy, layer_idx, fused_calls):
    """A converted layer keeps the policy table's bytes (mlp='geglu'; layer 0 without the attention norm) plus the
    RoPE tables it builds from its own rotary_emb in 4.57 (cos, sin: (1, T, dh) each; 5.x passes them in)."""
    torch.manual_seed(0)
    cfg = config(True)
    model = ModernBertModel(cfg).train()
    apply_fused_checkpointing(model, policy)
    layer = model.layers[layer_idx]
    x = torch.randn(B, T, cfg.hidden_size, requires_grad=True)
    pos = torch.arange(T)[None]
    dh = cfg.hidden_size // cfg.num_attention_heads
    rope_bytes = 2 * T * dh * 4  # 4.57: the layer builds (cos, sin) (1, T, dh) itself and they are saved
    if TF5:  # the model hands each layer its mask (None: no padding) and (cos, sin)
        rope = model.rotary_emb(x, pos, layer.attention_type)
        kept, _ = retained_activation_bytes(layer, x, None, rope)
        rope_bytes = 0
    else:
        global_mask, window_mask = model._update_attention_mask(torch.ones(B, T, dtype=torch.bool), False)
        kept, _ = retained_activation_bytes(layer, x, global_mask, window_mask, pos)
    assert len(fused_calls) == 1
    table = retained_bytes(policy, B, T, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                           mlp="geglu", attn_norm=layer_idx != 0)  # fmt: skip
    assert kept == table + rope_bytes


def test_bf16_autocast_close_to_hugging_face(fused_calls):
    """Under bf16 autocast (fp32 weights, right padding) the fused model's loss and gradients are within a few times
    Hugging Face's own bf16 error, both measured against the float64 model."""
    torch.manual_seed(0)
    ref = ModernBertForMaskedLM(config(True, "sdpa")).train()
    fused = copy.deepcopy(ref)
    apply_fused_checkpointing(fused, "block")
    batch_ = batch(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, g_ref = grads(ref, *batch_)
        loss, g = grads(fused, *batch_)
    assert len(fused_calls) == 4
    assert_step_within_bf16_error((loss, g), (loss_ref, g_ref), grads(copy.deepcopy(ref).double(), *batch_))


def test_window_mask_check_rejects_a_bias():
    """The sliding-window mask must be exactly the key mask within the band: a float mask carrying a bias where it
    keeps a key is not (the fused path would drop the bias), nor is one with another band."""
    from ckpt_ext.integrations.hf_modernbert import _window_mask_ok

    t, w = 6, 1
    keep = torch.tensor([[True] * 5 + [False]])
    pos = torch.arange(t)
    visible = keep[:, None, None, :] & ((pos[:, None] - pos[None, :]).abs() <= w)  # (1, 1, T, T)
    additive = torch.zeros(1, 1, t, t).masked_fill(~visible, torch.finfo(torch.float32).min)
    assert bool(_window_mask_ok(additive.clone(), keep, w)) and bool(_window_mask_ok(visible.clone(), keep, w))
    biased = additive.clone()
    biased[0, 0, 2, 3] = 0.5
    assert not bool(_window_mask_ok(biased, keep, w))
    assert not bool(_window_mask_ok(additive.clone(), keep, w + 1))


def test_mask_checks_run_once_per_forward(fused_calls, monkeypatch):
    """The band check of the sliding-window mask and the rows-without-a-key check read mask values (a host sync on a
    GPU): each runs once per forward and window (hf_masks.LayerMask.memo), not once per layer, and again at the next
    forward."""
    from ckpt_ext.integrations import hf_modernbert

    calls = {"band": 0, "rows": 0}
    for name, key in (("_window_mask_ok", "band"), ("_no_empty_rows", "rows")):
        real = getattr(hf_modernbert, name)
        monkeypatch.setattr(hf_modernbert, name, lambda *a, real=real, key=key: calls.update({key: calls[key] + 1})
                            or real(*a))  # fmt: skip
    model = ModernBertForMaskedLM(config(False)).train()
    apply_fused_checkpointing(model, "block")
    for step in (1, 2):
        grads(model, *batch(5))
        assert len(fused_calls) == 4 * step
        assert calls == {"band": step, "rows": 2 * step}  # one band; windows 0 (global) and 8 (local)
