"""Hugging Face Llama, Mistral, Qwen2 and Qwen3 converted by apply_fused_checkpointing match the unconverted models.

Tiny models are built from configs (no downloads). Ground truth is the unconverted model in float64 (Hugging Face's
RMSNorm still rounds through fp32 there, so it is float32-accurate, which is what we need): the converted fp32 model's
error in the loss and in every parameter gradient must be within a few times the unconverted fp32 model's own error
(plus a small floor). Families × policies × GQA ratio (1, 2, n_heads) × padding × llama3-scaled RoPE × Qwen2 biases ×
Qwen3 q/k norm; inference paths (no_grad, generate, eval with a cache) must fall back and stay unchanged.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ckpt_ext  # noqa: E402
from ckpt_ext.integrations.huggingface import apply_fused_checkpointing  # noqa: E402
from ckpt_ext.policies import POLICIES  # noqa: E402

HEADS, HIDDEN = 6, 72  # head_dim 12


def make_model(family="llama", kv=2, impl="sdpa", rope_scaling=None, layers=2, **overrides):
    base = dict(vocab_size=61, hidden_size=HIDDEN, intermediate_size=100, num_hidden_layers=layers,
                num_attention_heads=HEADS, num_key_value_heads=kv, max_position_embeddings=64, rms_norm_eps=1e-6,
                pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
    base.update(overrides)
    if family == "llama":
        cfg = transformers.LlamaConfig(rope_scaling=rope_scaling, **base)
        model_cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        cfg = transformers.MistralConfig(**{"sliding_window": None, **base})
        model_cls = transformers.MistralForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**base)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.Qwen3Config(**{"head_dim": 16, **base})
        model_cls = transformers.Qwen3ForCausalLM
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    model = model_cls(cfg)
    with torch.no_grad():  # non-trivial norm weights and biases, so their gradients are exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.train()


def batch(padding=None, b=2, t=9):
    torch.manual_seed(1)
    ids = torch.randint(1, 61, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    if padding == "left":
        mask[0, :3] = 0
        mask[1, :1] = 0
    elif padding == "right":
        mask[0, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ids = ids.masked_fill(mask == 0, 0)
    return dict(input_ids=ids, attention_mask=mask if padding else None, labels=labels)


def step(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a, ref, scale):
    return ((a.double() - ref.double()).norm() / max(ref.double().norm().item(), scale)).item()


def assert_parity(model, inputs, policy, factor=4.0, floor=2e-6, backend="reference"):
    """loss and every gradient of the converted fp32 model vs the fp64 unconverted model, within factor × the fp32
    unconverted model's own error (+ floor)."""
    ref64 = copy.deepcopy(model).double()
    loss64, grads64 = step(ref64, inputs)
    loss32, grads32 = step(copy.deepcopy(model), inputs)
    fused = copy.deepcopy(model)
    n = apply_fused_checkpointing(fused, policy)
    assert n == model.config.num_hidden_layers
    with ckpt_ext.set_backend(backend):
        loss, grads = step(fused, inputs)
    assert grads.keys() == grads64.keys()
    scale = max(g.norm().item() / g.numel() ** 0.5 for g in grads64.values())
    worst = []
    for name, g64 in grads64.items():
        s = scale * g64.numel() ** 0.5
        ours, theirs = rel_err(grads[name], g64, s), rel_err(grads32[name], g64, s)
        worst.append((ours - factor * theirs, name, ours, theirs))
        assert ours <= factor * theirs + floor, f"{name}: ours {ours:.2e} vs Hugging Face fp32 {theirs:.2e}"
    ours, theirs = abs(loss.item() - loss64.item()), abs(loss32.item() - loss64.item())
    assert ours <= factor * theirs + floor * abs(loss64.item()), f"loss: ours {ours:.2e} vs HF fp32 {theirs:.2e}"


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_family_policy_parity(family, policy):
    assert_parity(make_model(family, kv=2), batch(), policy)


@pytest.mark.parametrize("kv", [1, 2, HEADS])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_gqa_ratio_and_padding(kv, padding):
    assert_parity(make_model("llama", kv=kv), batch(padding), "block")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("policy", ["pointwise", "ffn", "block"])
def test_cpp_backend_qwen3_with_bias_and_padding(backend, policy):
    model = make_model("qwen3", kv=3, attention_bias=True)
    assert_parity(model, batch("left"), policy, backend=backend)


def test_llama3_scaled_rope_and_biases():
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)  # fmt: skip
    model = make_model("llama", kv=3, rope_scaling=scaling, attention_bias=True, mlp_bias=True)
    for policy in ("none", "block"):
        assert_parity(model, batch("left"), policy)


def test_eager_attention_and_packed_sequences():
    """eager attention gets an additive finfo.min mask; packed position_ids give a block-diagonal mask (4.57)."""
    model = make_model("qwen2", kv=2, impl="eager")
    assert_parity(model, batch("right"), "ffn")
    packed = batch()
    packed["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]] * 2)
    assert_parity(make_model("llama", kv=2), packed, "block")


def test_sliding_window_encoded_by_mask_or_fallback(caplog):
    model = make_model("mistral", kv=2, sliding_window=4)
    assert_parity(model, batch(), "block")


def test_gradient_checkpointing_flag_does_not_double_recompute(monkeypatch):
    model = make_model("llama")
    model.gradient_checkpointing_enable()
    ref = copy.deepcopy(model)
    apply_fused_checkpointing(model, "block")
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss, grads = step(model, batch())
    loss_ref, grads_ref = step(ref, batch())
    assert not calls
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-6)


def test_structure_unchanged_and_hidden_states():
    model = make_model("qwen3")
    keys = list(model.state_dict())
    params = [p.data_ptr() for p in model.parameters()]
    apply_fused_checkpointing(model, "ffn")
    assert list(model.state_dict()) == keys and [p.data_ptr() for p in model.parameters()] == params
    assert all(isinstance(layer, transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer)
               for layer in model.model.layers)  # fmt: skip
    out = model(**batch(), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_inference_paths_fall_back(fused_calls):
    """no_grad, generate() and eval with a cache run the original forward: results identical to the unconverted."""
    model = make_model("llama").eval()
    ref = copy.deepcopy(model)
    apply_fused_checkpointing(model, "block")
    calls = fused_calls
    ids = batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    gen = model.generate(ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(gen, ref.generate(ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0))
    out = model(ids, use_cache=True)  # eval + grad + cache: the cache is filled, the next token step is exact
    out_ref = ref(ids, use_cache=True)
    assert out.past_key_values.get_seq_length() == ids.shape[1]
    nxt = torch.tensor([[5], [7]])
    torch.testing.assert_close(model(nxt, past_key_values=out.past_key_values).logits,
                               ref(nxt, past_key_values=out_ref.past_key_values).logits)  # fmt: skip
    assert not calls
    model.train()
    model(ids).logits.sum().backward()
    assert len(calls) == model.config.num_hidden_layers


def test_bf16_autocast_close_to_hugging_face():
    model = make_model("qwen3", kv=3)
    fused = copy.deepcopy(model)
    apply_fused_checkpointing(fused, "block")
    inputs = batch("left")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, grads_ref = step(model, inputs)
        loss, grads = step(fused, inputs)
    ref64 = copy.deepcopy(model).double()
    loss64, grads64 = step(ref64, inputs)
    assert abs(loss.item() - loss64.item()) <= 3 * abs(loss_ref.item() - loss64.item()) + 1e-3
    for name, g64 in grads64.items():
        ours = rel_err(grads[name], g64, 0.0)
        theirs = rel_err(grads_ref[name], g64, 0.0)
        assert ours <= 3 * theirs + 2e-2, f"{name}: {ours:.3f} vs HF bf16 {theirs:.3f}"


def test_unsupported_config_is_named():
    model = make_model("llama", hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        apply_fused_checkpointing(model, "block")


@pytest.mark.triton
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_triton_kernels_match_hugging_face(family):
    """Every Llama-family op on the Triton backend (interpreter on CPU) inside a converted tiny model, each policy,
    against Hugging Face's own layers."""
    extra = {"head_dim": 8} if family == "qwen3" else {}
    model = make_model(family, kv=2, layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=4, **extra)
    for policy in POLICIES:
        assert_parity(model, batch("left", b=2, t=5), policy, backend="triton")


def test_compiled_model_with_left_padding_matches_eager():
    """torch.compile of a converted model with a left-padding mask (dynamo may break the graph around Hugging Face's
    layer wrappers; the segment-id conversion reads the mask's values and is skipped inside a compiled region, where
    the layers keep the 4-D mask): loss and gradients equal the eager converted model's."""
    torch._dynamo.reset()
    model = make_model()
    assert apply_fused_checkpointing(model, policy="block") == 2
    inputs = batch("left")
    eager_loss, eager_grads = step(model, inputs)
    loss, grads = step(torch.compile(model, backend="aot_eager"), inputs)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    grads = {name.removeprefix("_orig_mod."): g for name, g in grads.items()}  # the compiled wrapper's names
    assert grads.keys() == eager_grads.keys()
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)
