"""Hugging Face integration: GPT-2 and ViT patched by apply_fused_checkpointing match the unpatched models.

Tiny models are built from configs (no downloads). fp32, dropout 0: loss and every gradient agree to ~1e-5 relative;
dropout > 0: two policies under one torch seed draw the same masks, so their gradients agree; inference paths
(no_grad, generate, a filled KV cache, output_attentions) fall back to the original forward.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ckpt_ext.integrations.huggingface import apply_fused_checkpointing, remove_fused_checkpointing  # noqa: E402

TF5 = int(transformers.__version__.split(".")[0]) >= 5


def gpt2(impl="eager", p=0.0, **overrides):
    kw = dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=97, attn_pdrop=p, resid_pdrop=p,
              embd_pdrop=p, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    kw.update(overrides)
    cfg = transformers.GPT2Config(**kw)
    cfg._attn_implementation = impl
    return transformers.GPT2LMHeadModel(cfg).train()


def vit(p=0.0, **overrides):
    kw = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, hidden_dropout_prob=p, attention_probs_dropout_prob=p, num_labels=5)  # fmt: skip
    kw.update(overrides)
    return transformers.ViTForImageClassification(transformers.ViTConfig(**kw)).train()


def assert_grads_match(fused, ref, rtol=1e-5):
    """Relative error per tensor; a gradient that is zero in exact math (e.g. key biases) is compared against the
    model's overall gradient scale instead of its own rounding noise."""
    ref_grads = dict(ref.named_parameters())
    scale = max(p.grad.norm() / p.grad.numel() ** 0.5 for p in ref.parameters() if p.grad is not None)
    for name, p in fused.named_parameters():
        g, g_ref = p.grad, ref_grads[name].grad
        assert (g is None) == (g_ref is None), name
        if g is not None:
            err = (g - g_ref).norm() / torch.maximum(g_ref.norm(), scale * g_ref.numel() ** 0.5)
            assert err < rtol, f"{name}: relative error {err:.2e}"


def lm_batch(padding):
    ids = torch.randint(1, 97, (3, 16))
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, 11:] = 0
    elif padding == "left":
        mask[2, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)  # labels[2, 5] is predicted from a pad row that sees no key
    return ids, (None if padding is None else mask), labels


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_gpt2_loss_and_grads_match(impl, padding, fused_calls):
    ref = gpt2(impl)
    model = copy.deepcopy(ref)
    assert apply_fused_checkpointing(model, policy="block" if padding == "left" else "ffn") == 2
    ids, mask, labels = lm_batch(padding)
    loss_ref = ref(ids, attention_mask=mask, labels=labels).loss
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss_ref.backward()
    loss.backward()
    # eager attention gives pad rows that see no key uniform weights, the fused kernels zeros: those layers fall back
    assert len(fused_calls) == (0 if (impl, padding) == ("eager", "left") else 2)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert_grads_match(model, ref)


def test_gpt2_parameters_shared_state_dict_unchanged():
    model = gpt2()
    before = model.state_dict()
    assert apply_fused_checkpointing(model, policy="pointwise", every=2) == 1
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)
    assert [type(b).__name__ for b in model.transformer.h] == ["GPT2Block", "FusedGPT2Block"]
    assert isinstance(model.transformer.h[1], transformers.models.gpt2.modeling_gpt2.GPT2Block)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, _, labels = lm_batch(None)
    model(ids, labels=labels).loss.backward()
    opt.step()
    plain = gpt2()
    plain.load_state_dict(model.state_dict())
    assert apply_fused_checkpointing(model, policy="block") == 2  # re-apply: new policy everywhere
    assert {b._ckpt_policy for b in model.transformer.h} == {"block"}
    assert remove_fused_checkpointing(model) == 2
    assert {type(b).__name__ for b in model.transformer.h} == {"GPT2Block"}


def test_gpt2_dropout_masks_replayed(fused_calls):
    ref = gpt2(p=0.1)
    grads = []
    ids, _, labels = lm_batch(None)
    for policy in ("none", "block"):
        model = copy.deepcopy(ref)
        apply_fused_checkpointing(model, policy=policy)
        torch.manual_seed(1)
        model(ids, labels=labels).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert len(fused_calls) == 4
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    model.eval()
    with torch.no_grad():  # eval: dropout off, matches the unpatched model in eval mode
        torch.testing.assert_close(model(ids, labels=labels).loss, ref.eval()(ids, labels=labels).loss)


def test_gpt2_inference_paths_fall_back(fused_calls):
    ref = gpt2("sdpa").eval()
    model = copy.deepcopy(ref)
    apply_fused_checkpointing(model)
    ids, mask, _ = lm_batch("left")
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)
        out = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        assert out.tolist() == ref.generate(ids[:1, :5], max_new_tokens=6, do_sample=False).tolist()
    assert fused_calls == []
    with torch.no_grad():
        prefix = ref(ids[:, :8], use_cache=True)
    cache = prefix.cache if TF5 else prefix.past_key_values
    step = model(ids[:, 8:9], **{"cache" if TF5 else "past_key_values": cache})  # filled cache: original forward
    assert fused_calls == []
    torch.testing.assert_close(step.logits[:, -1], ref(ids[:, :9]).logits[:, -1], rtol=1e-5, atol=1e-5)


def cache_of(out):
    return out.cache if TF5 else out.past_key_values


def cache_kw(cache):
    return {"cache" if TF5 else "past_key_values": cache}


def test_gpt2_eval_with_grad_fills_kv_cache(fused_calls):
    """Issue 15 item 2: eval() + grad enabled + use_cache=True used to fuse and return an empty cache, so the cached
    next-token step was off by 0.41 in the logits. A cache requested outside training is now filled."""
    torch.manual_seed(0)
    ref = gpt2().eval()
    model = copy.deepcopy(ref)
    apply_fused_checkpointing(model)
    ids, mask, _ = lm_batch("right")
    first = model(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
    first_ref = ref(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
    assert fused_calls == []
    cache, cache_ref = cache_of(first), cache_of(first_ref)
    assert cache.get_seq_length() == cache_ref.get_seq_length() == 8
    step = model(ids[:, 8:9], attention_mask=mask[:, :9], use_cache=True, **cache_kw(cache))
    step_ref = ref(ids[:, 8:9], attention_mask=mask[:, :9], use_cache=True, **cache_kw(cache_ref))
    torch.testing.assert_close(step.logits, step_ref.logits, rtol=1e-5, atol=1e-5)
    full = ref(ids[:, :9], attention_mask=mask[:, :9]).logits[:, -1:]
    torch.testing.assert_close(step.logits, full, rtol=1e-5, atol=1e-5)
    step.logits.sum().backward()  # gradients flow through the cached keys and values as in the plain model
    step_ref.logits.sum().backward()
    assert_grads_match(model, ref)


def test_gpt2_training_with_empty_cache_still_fuses(fused_calls):
    """While training, GPT-2 passes an empty cache by default (use_cache=True): the fused path runs and the loss and
    gradients match the plain model; only the (unused) cache stays empty, as with Hugging Face's checkpointing."""
    ref = gpt2()
    model = copy.deepcopy(ref)
    apply_fused_checkpointing(model, policy="ffn")
    ids, mask, labels = lm_batch("right")
    out = model(ids, attention_mask=mask, labels=labels, use_cache=True)
    out_ref = ref(ids, attention_mask=mask, labels=labels, use_cache=True)
    assert len(fused_calls) == 2
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=0)
    out.loss.backward()
    out_ref.loss.backward()
    assert_grads_match(model, ref)


def test_hf_gradient_checkpointing_does_not_recompute_twice(fused_calls):
    ref = gpt2()
    model = copy.deepcopy(ref)
    apply_fused_checkpointing(model, policy="ffn")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask, labels = lm_batch("right")
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    ref(ids, attention_mask=mask, labels=labels).loss.backward()
    assert len(fused_calls) == 2  # a torch.utils.checkpoint around the layers would have called them again
    assert_grads_match(model, ref)


@pytest.mark.skipif(TF5, reason="transformers 5 removed output_attentions from GPT-2")
def test_gpt2_output_attentions_fall_back(fused_calls):
    model = gpt2("eager")
    apply_fused_checkpointing(model)
    ids, _, labels = lm_batch(None)
    out = model(ids, labels=labels, output_attentions=True)
    assert len(out.attentions) == 2 and fused_calls == []
    out.loss.backward()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(activation_function="relu"), "activation_function"),
        (dict(add_cross_attention=True), "add_cross_attention"),
    ],
)
def test_gpt2_unsupported_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        apply_fused_checkpointing(gpt2(**overrides))


def test_unsupported_model_raises():
    with pytest.raises(TypeError, match="GPT-2.*ViT"):
        apply_fused_checkpointing(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="policy"):
        apply_fused_checkpointing(gpt2(), policy="everything")


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_vit_loss_and_grads_match(qkv_bias, fused_calls):
    ref = vit(qkv_bias=qkv_bias)
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    assert apply_fused_checkpointing(model, policy="ffn") == 2
    assert list(model.state_dict()) == keys
    pixels, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 4])
    loss_ref, loss = ref(pixels, labels=labels).loss, model(pixels, labels=labels).loss
    loss_ref.backward()
    loss.backward()
    assert len(fused_calls) == 2
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert_grads_match(model, ref)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(pixels).logits, ref.eval()(pixels).logits, rtol=1e-5, atol=1e-6)


def test_vit_dropout_masks_replayed():
    ref = vit(p=0.1)
    grads = []
    for policy in ("pointwise", "block"):
        model = copy.deepcopy(ref)
        apply_fused_checkpointing(model, policy=policy)
        torch.manual_seed(3)
        model(torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 2])).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_vit_unsupported_activation_raises():
    with pytest.raises(ValueError, match="hidden_act"):
        apply_fused_checkpointing(vit(hidden_act="relu"))
