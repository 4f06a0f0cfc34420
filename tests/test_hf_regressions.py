"""Regression tests for Hugging Face converted models (issues 21 and 22): each failed on c503ee1.

Tiny GPT-2 and Llama models from configs (no downloads), fp32, dropout 0. A converted model's loss and every gradient
are compared with the unconverted model's on the same inputs: exact where the converted layer runs its original forward
(a fallback), within fp32 rounding where it runs fused.
"""

import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ckpt_ext.integrations import hf_common  # noqa: E402
from ckpt_ext.integrations.huggingface import apply_fused_checkpointing  # noqa: E402

VOCAB, T = 61, 10


def llama(impl="sdpa", layers=2):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, use_cache=False)  # fmt: skip
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).train()


def gpt2(impl="sdpa", layers=2):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, vocab_size=VOCAB, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0, use_cache=False)  # fmt: skip
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).train()


MODELS = {"llama": llama, "gpt2": gpt2}


@pytest.fixture
def warnings_seen(monkeypatch, caplog):
    """Fresh warn_once state; returns the list of ckpt_ext warning messages logged so far (call it)."""
    monkeypatch.setattr(hf_common, "_WARNED", set())
    caplog.set_level(logging.WARNING, logger="ckpt_ext.integrations")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "ckpt_ext.integrations"]


def step(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(model, ref, inputs, exact=False):
    """Loss and every gradient of ``model`` equal ``ref``'s (bitwise when ``exact``, else within fp32 rounding)."""
    loss, grads = step(model, **inputs)
    loss_ref, grads_ref = step(ref, **inputs)
    assert grads.keys() == grads_ref.keys()
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(loss, loss_ref, **tol)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, **tol, msg=lambda m, name=name: f"{name}: {m}")


def left_padded(b=3):
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (b, T))
    mask = torch.ones(b, T, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


# ------------------------------------------------------------------------------------------------ issue 21, item 4
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padding_with_labels_on_pad_positions(family, impl, fused_calls, warnings_seen):
    """Labels on every position, pads included: the rows padding leaves no key decide the loss. Eager attention gives
    them a uniform softmax (finfo.min mask), so an eager layer runs its original forward there (warned once); SDPA
    gives zeros, as the fused kernels do, so it fuses."""
    ref = MODELS[family](impl)
    model = copy.deepcopy(ref)
    apply_fused_checkpointing(model, "block")
    ids, mask = left_padded()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids)
    for _ in range(2):
        assert_same_step(model, ref, inputs, exact=impl == "eager")
    eager_warnings = [m for m in warnings_seen() if "eager attention" in m]
    if impl == "eager":
        assert not fused_calls
        assert len(eager_warnings) == 1 and "left padding" in eager_warnings[0]
        no_pad = dict(input_ids=ids, labels=ids)  # without padding eager layers fuse
        assert_same_step(model, ref, no_pad)
        assert len(fused_calls) == 2
    else:
        assert len(fused_calls) == 4 and not eager_warnings


# ------------------------------------------------------------------------------------------------ issue 21, item 5
@pytest.mark.parametrize("kind", ["bool-sdpa", "additive-eager"])
def test_custom_causal_4d_mask_of_batch_one(kind, fused_calls):
    """A custom exactly-causal (1, 1, T, T) mask for a batch of 3, with the model's default (1, T) position_ids: the
    segment ids are expanded to the batch, as Hugging Face broadcasts the mask."""
    ref = llama("sdpa" if kind.endswith("sdpa") else "eager")
    model = copy.deepcopy(ref)
    apply_fused_checkpointing(model, "block")
    ids, _ = left_padded()
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    if kind.startswith("additive"):
        causal = torch.zeros(1, 1, T, T).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert_same_step(model, ref, dict(input_ids=ids, attention_mask=causal, labels=ids))
    assert len(fused_calls) == 2


# ------------------------------------------------------------------------------------------------ issue 21, item 6
@pytest.mark.parametrize("made_in_inference_mode", ["position_ids", "4d_mask"])
def test_inputs_created_under_inference_mode(made_in_inference_mode, fused_calls):
    """position_ids (or a 4-D mask) built under torch.inference_mode (e.g. in a collate function), then a training
    step with padding: inference tensors have no version counter, and nothing may ask for one."""
    ref = llama()
    model = copy.deepcopy(ref)
    apply_fused_checkpointing(model, "block")
    ids, mask = left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.inference_mode():
        if made_in_inference_mode == "position_ids":
            extra = dict(attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0))
        else:
            keep = mask.bool()[:, None, None, :] & torch.ones(T, T, dtype=torch.bool).tril()
            extra = dict(attention_mask=keep)
    assert_same_step(model, ref, dict(input_ids=ids, labels=labels, **extra))
    assert len(fused_calls) == 2


# ------------------------------------------------------------------------------------------------ issue 21, item 9
@pytest.mark.parametrize("path", ["segment_ids", "additive"])
@pytest.mark.parametrize("how", [".data", ".numpy()"])
def test_mask_changed_in_place_without_version_bump(how, path, fused_calls):
    """A custom 4-D mask and position_ids reused across steps (as a collate function may hand them out), the mask
    changed in place through .data or a NumPy view (no version bump): the next step must see the new mask. Left padding
    reaches the kernels as segment ids, a mask with a hole as the additive mask; both conversions were cached on the
    mask."""
    ref = llama()
    model = copy.deepcopy(ref)
    apply_fused_checkpointing(model, "block")
    ids, _ = left_padded()
    keep = torch.ones(3, T, dtype=torch.bool)
    keep[0, :2] = False
    mask = keep[:, None, None, :] & torch.ones(T, T, dtype=torch.bool).tril()  # (B, 1, T, T)
    labels = ids.masked_fill(~keep, -100)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, position_ids=torch.arange(T).expand(3, T))
    assert_same_step(model, ref, inputs)
    view = mask.data if how == ".data" else torch.from_numpy(mask.numpy())  # a NumPy view: writes bypass torch
    if path == "segment_ids":
        view[1, :, :, :4] = False  # more left padding: still causal ∧ keep
        labels[1, :4] = -100
    else:
        view[1, :, 5:, 3] = False  # rows 5.. of batch 1 lose key 3: not a segment mask
    assert_same_step(model, ref, inputs)
    assert len(fused_calls) == 4


# ------------------------------------------------------------------------------------------------ issue 22, item 2
LORA_TARGETS = {"llama": ["q_proj", "v_proj", "gate_proj"], "gpt2": ["c_attn", "c_fc"]}


def lora_model(family, order, use_dora=False):
    """(converted PEFT model, unconverted PEFT model) with equal random LoRA weights (B nonzero, so A gets a gradient);
    ``order``: convert before or after get_peft_model."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[family], init_lora_weights=False,
                             use_dora=use_dora, fan_in_fan_out=family == "gpt2")  # fmt: skip
    base = MODELS[family]()
    ref_base = copy.deepcopy(base)
    if order == "before":
        apply_fused_checkpointing(base, "block")
    torch.manual_seed(3)
    model = peft.get_peft_model(base, config)
    torch.manual_seed(3)
    ref = peft.get_peft_model(ref_base, copy.deepcopy(config))
    if order == "after":
        apply_fused_checkpointing(model, "block")
    return model, ref


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_adapters_fuse_or_run_the_original_forward_with_one_warning(family, order, use_dora, fused_calls,
                                                                         warnings_seen):  # fmt: skip
    """Plain LoRA layers run fused (LoRA inside the op graph, no warning); DoRA is not plain LoRA: converted layers run
    their original forward (the adapters train, with the unconverted PEFT model's gradients) and one warning names the
    module. Either way the gradients are the unconverted PEFT model's; merge_and_unload() gives plain linears back."""
    model, ref = lora_model(family, order, use_dora)
    ids, mask = left_padded()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    for _ in range(2):
        assert_same_step(model, ref, inputs, exact=use_dora)
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    if use_dora:
        assert not fused_calls
        (message,) = warnings_seen()
        assert "runs its original forward" in message and "LoRA variant" in message
    else:
        assert len(fused_calls) == 4 and not warnings_seen()
    fused_calls.clear()
    merged, merged_ref = model.merge_and_unload(), ref.merge_and_unload()
    for p in [*merged.parameters(), *merged_ref.parameters()]:  # PEFT froze the base weights
        p.requires_grad_(True)
    assert_same_step(merged, merged_ref, inputs)
    assert len(fused_calls) == 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_with_input_require_grads_and_gradient_checkpointing(family, fused_calls, warnings_seen):
    """What Trainer does for PEFT + gradient checkpointing: enable_input_require_grads() and
    gradient_checkpointing_enable() on the converted PEFT model; the layers fuse and the LoRA gradients equal the
    unconverted model's."""
    model, ref = lora_model(family, "after")
    for m in (model, ref):
        m.enable_input_require_grads()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = left_padded()
    assert_same_step(model, ref, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))
    assert len(fused_calls) == 2
    assert not any("original forward" in m for m in warnings_seen())


class WrappedLinear(torch.nn.Linear):
    """Stands for a quantized or otherwise wrapped linear (bitsandbytes' Linear8bitLt/Linear4bit subclass nn.Linear)."""

    def forward(self, x):
        return super().forward(x) * 1.5


@pytest.mark.parametrize("change", ["subclass", "forward_hook", "pre_hook", "norm_hook"])
def test_wrapped_linears_and_hooks_run_the_original_forward(change, fused_calls, warnings_seen):
    ref = llama()
    model = copy.deepcopy(ref)
    apply_fused_checkpointing(model, "block")  # changed after conversion: checked at every forward
    for m in (model, ref):
        attn = m.model.layers[1].self_attn
        if change == "subclass":
            old = attn.o_proj
            attn.o_proj = WrappedLinear(old.in_features, old.out_features, bias=False)
            attn.o_proj.weight = old.weight
        elif change == "forward_hook":
            attn.k_proj.register_forward_hook(lambda mod, args, out: out * 2)
        elif change == "pre_hook":
            attn.k_proj.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
        else:
            m.model.layers[1].input_layernorm.register_forward_hook(lambda mod, args, out: out + 1)
    ids, mask = left_padded()
    assert_same_step(model, ref, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))
    assert len(fused_calls) == 1  # layer 0 fuses, layer 1 falls back
    (message,) = warnings_seen()
    name = {"subclass": "self_attn.o_proj", "norm_hook": "input_layernorm"}.get(change, "self_attn.k_proj")
    assert name in message and ("WrappedLinear" in message if change == "subclass" else "hook" in message)


def test_unknown_attention_implementation_runs_the_original_forward(fused_calls, warnings_seen):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    transformers.AttentionInterface.register("ckpt_ext_test_attention", sdpa_attention_forward)
    ref = llama("sdpa")
    ref.config._attn_implementation = "ckpt_ext_test_attention"
    model = copy.deepcopy(ref)
    apply_fused_checkpointing(model, "block")
    ids, mask = left_padded()
    assert_same_step(model, ref, dict(input_ids=ids, labels=ids), exact=True)
    assert not fused_calls
    (message,) = warnings_seen()
    assert "'ckpt_ext_test_attention'" in message


def test_flex_attention_warns(warnings_seen):
    """flex_attention hands the layers a BlockMask: they run the original forward and say so (flex attention has no
    CPU backward, so here both models raise the same error; on a GPU both train)."""
    ref = llama("flex_attention", layers=1)
    model = copy.deepcopy(ref)
    apply_fused_checkpointing(model, "block")
    ids, mask = left_padded()
    for m in (ref, model):
        with pytest.raises(NotImplementedError, match="FlexAttention"):
            m(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    (message,) = warnings_seen()
    assert "'flex_attention'" in message


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_enable_is_replaced_and_reported(family, fused_calls, warnings_seen, monkeypatch):
    """gradient_checkpointing_enable() on a converted model logs once that ckpt_ext replaces it, does not wrap the
    fused layers, and is_gradient_checkpointing does not claim Hugging Face's checkpointing is on; with every=2 the
    unconverted layers keep it (and the claim is true)."""
    ref = MODELS[family](layers=2)
    model = copy.deepcopy(ref)
    apply_fused_checkpointing(model, "block")
    model.gradient_checkpointing_enable()
    assert not model.is_gradient_checkpointing
    assert len([m for m in warnings_seen() if "gradient_checkpointing_enable" in m]) == 1
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, _ = left_padded()
    assert_same_step(model, ref, dict(input_ids=ids, labels=ids))
    assert not calls and len(fused_calls) == 2
    half = copy.deepcopy(ref)
    apply_fused_checkpointing(half, "block", every=2)
    half.gradient_checkpointing_enable()
    assert half.is_gradient_checkpointing
    copied = copy.deepcopy(model)  # the copy's flags follow the copy
    copied.gradient_checkpointing_enable()
    assert not copied.is_gradient_checkpointing


# ------------------------------------------------------------------------------------------------ issue 22, item 4
def test_top_level_kernels_folder_hands_over_to_the_distribution(tmp_path):
    """From the repository root, ``import kernels`` must give the installed ``kernels`` distribution (transformers 5
    imports it), submodules included, while ``ckpt_ext.kernels`` stays ours; without a distribution it stays ours."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    dist = tmp_path / "kernels"
    dist.mkdir()
    (dist / "__init__.py").write_text("FROM_DISTRIBUTION = True\n")
    (dist / "layer.py").write_text("LAYER = 7\n")
    root = Path(__file__).resolve().parents[1]
    code = "import kernels, kernels.layer, ckpt_ext.kernels as ours; print(kernels.FROM_DISTRIBUTION, kernels.layer.LAYER, ours.__name__)"  # noqa: E501
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "7", "ckpt_ext.kernels"]
    bare = "import kernels; print(kernels.__file__)"  # -S: no site-packages, so no distribution anywhere
    run = subprocess.run([sys.executable, "-S", "-c", bare], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == root / "kernels" / "__init__.py"


# ------------------------------------------------------------------------------------------------ issue 22, item 5
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fullgraph_compile_of_a_converted_model(family, padding, fused_calls):
    """torch.compile(fullgraph=True) of a converted model: forward + backward equal the eager converted model's and the
    unconverted model's, and dynamo finds no graph break (the loss is taken outside the model: GPT-2's own loss
    function breaks the graph in the unconverted model too)."""
    torch._dynamo.reset()
    ref = MODELS[family]()
    model = copy.deepcopy(ref)
    apply_fused_checkpointing(model, "block")
    ids, mask = left_padded()
    mask = mask if padding else None
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)

    def loss_of(m):
        logits = m(input_ids=ids, attention_mask=mask).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    def run(fn, m):
        m.zero_grad(set_to_none=True)
        loss = fn(m)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    eager = run(loss_of, model)
    unconverted = run(loss_of, ref)
    compiled = run(torch.compile(loss_of, fullgraph=True, backend="aot_eager"), model)
    assert len(fused_calls) == 4  # 2 layers, eager and traced
    for expected in (eager, unconverted):
        torch.testing.assert_close(compiled[0], expected[0], rtol=1e-5, atol=1e-6)
        for name, g in expected[1].items():
            torch.testing.assert_close(compiled[1][name], g, rtol=1e-4, atol=2e-6)
    torch._dynamo.reset()
    assert torch._dynamo.explain(loss_of)(model).graph_break_count == 0


def test_gpt2_dropout_p_read_from_the_modules(fused_calls, warnings_seen):
    """A dropout schedule sets p on the nn.Dropout modules (the original forward reads them), not on the config: the
    fused layers follow the modules; residual branches set apart run the original forward, warned."""
    model = MODELS["gpt2"]()
    model.config.attn_pdrop = model.config.resid_pdrop = 0.1
    ref = copy.deepcopy(model)
    apply_fused_checkpointing(model, "block")
    ids, mask = left_padded()
    inputs = dict(input_ids=ids, labels=ids)
    for m in (model, ref):
        for d in m.modules():
            if isinstance(d, torch.nn.Dropout):
                d.p = 0.0
    assert_same_step(model, ref, inputs)
    assert len(fused_calls) == 2
    model.transformer.h[0].mlp.dropout.p = 0.2
    model(**inputs)
    assert any("different dropout on the residual branches" in m for m in warnings_seen())


def test_vit_dropout_read_live_and_mixed_residual_dropout_falls_back(fused_calls, warnings_seen):
    """ViT's dropouts are read from its modules at every forward: a schedule that sets p on the modules (config says
    0.1) reaches the fused layer. 4.57 has one module per residual branch: set apart, the layer runs its original
    forward with a warning instead of raising (5.x has one module for both branches, so they cannot differ)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=64, num_labels=5, hidden_dropout_prob=0.1,
                                 attention_probs_dropout_prob=0.0)  # fmt: skip
    model = transformers.ViTForImageClassification(cfg).train()
    ref = copy.deepcopy(model)
    apply_fused_checkpointing(model, "block")
    for m in (*model.modules(), *ref.modules()):
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    inputs = dict(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 1]))
    assert_same_step(model, ref, inputs)
    assert len(fused_calls) == 1
    layer = next(m for m in model.modules() if hasattr(m, "_ckpt_policy"))  # the converted ViTLayer
    if hasattr(layer, "output"):  # 4.57: attention.output.dropout and output.dropout
        layer.output.dropout.p = 0.3
        model(**inputs).loss.backward()
        assert len(fused_calls) == 1
        assert any("different dropout on the residual branches" in m for m in warnings_seen())
