"""PEFT LoRA on converted Hugging Face models: the fused layers run LoRA inside the op graph and match the unconverted
PEFT model (loss, every LoRA A/B gradient, base gradients None), in both conversion orders, for Llama, Mistral, Qwen2,
Qwen3, GPT-2, ViT and the encoders (BERT, DistilBERT, ModernBERT), every policy, q,v and all-linear targets, with
padding and packing; lora_dropout replays its masks; adapters disabled / switched / merged behave as PEFT's; a LoRA
step's FLOPs stay at or below the unconverted model's; Trainer with gradient_checkpointing=True trains the same loss
curve for 20 steps."""

from __future__ import annotations

import copy

import pytest
import torch
from test_hf_llama import make_model
from test_lora_block import matmul_flops

from ckpt_ext.integrations.huggingface import apply_fused_checkpointing
from ckpt_ext.policies import POLICIES, POST_LN_POLICIES

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = {
    "llama": {"qv": ["q_proj", "v_proj"], "all": "all-linear"},
    "gpt2": {"qv": ["c_attn"], "all": ["c_attn", "c_proj", "c_fc"]},
    "vit": {"qv": ["query", "value"], "all": ["query", "key", "value", "dense"]},
    "bert": {"qv": ["query", "value"], "all": ["query", "key", "value", "dense"]},
    "distilbert": {"qv": ["q_lin", "v_lin"], "all": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]},
    "modernbert": {"qv": ["Wqkv"], "all": ["Wqkv", "Wo", "Wi"]},
}
ENCODERS = ("bert", "distilbert", "modernbert")
if int(transformers.__version__.split(".")[0]) >= 5:  # 5.x renamed ViT's linears
    TARGETS["vit"] = {"qv": ["q_proj", "v_proj"], "all": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]}
LLAMA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _base(family: str, p: float = 0.0):
    torch.manual_seed(0)
    if family in LLAMA_FAMILIES:
        return make_model(family, kv=2, attention_dropout=p)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=32,
            vocab_size=97,
            attn_pdrop=p,
            resid_pdrop=p,
            embd_pdrop=p,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        cfg._attn_implementation = "sdpa"  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg).train()
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, hidden_dropout_prob=p, attention_probs_dropout_prob=p,
                                      max_position_embeddings=32, attn_implementation="sdpa")  # fmt: skip
        return transformers.BertForMaskedLM(cfg).train()
    if family == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, hidden_dim=96, dropout=p,
                                            attention_dropout=p, max_position_embeddings=32)  # fmt: skip
        return transformers.DistilBertForMaskedLM(cfg).train()
    if family == "modernbert":
        cfg = transformers.ModernBertConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, local_attention=8, global_attn_every_n_layers=2,
                                            attention_dropout=p, mlp_dropout=p, embedding_dropout=0.0, pad_token_id=0,
                                            max_position_embeddings=64, reference_compile=False,
                                            attn_implementation="sdpa")  # fmt: skip
        return transformers.ModernBertForMaskedLM(cfg).train()
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=p,
                                 attention_probs_dropout_prob=p, num_labels=5)  # fmt: skip
    return transformers.ViTForImageClassification(cfg).train()


def _lora_config(family: str, targets: str, dropout: float = 0.0, **kw):
    kind = "llama" if family in LLAMA_FAMILIES else family
    extra = {"modules_to_save": ["classifier"]} if family == "vit" else {}
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS[kind][targets],
                           **extra, **kw)  # fmt: skip


def _randomize_b(model) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)


def models(family: str, targets: str, policy: str, order: str, dropout: float = 0.0, **kw):
    """(unconverted PEFT model, converted PEFT model) with identical weights; ``order``: convert "before" or "after"
    get_peft_model."""
    ref = peft.get_peft_model(_base(family), _lora_config(family, targets, dropout, **kw))
    _randomize_b(ref)
    if order == "after":
        fused = copy.deepcopy(ref)
        apply_fused_checkpointing(fused, policy)
    else:
        base = _base(family)
        apply_fused_checkpointing(base, policy)
        fused = peft.get_peft_model(base, _lora_config(family, targets, dropout, **kw))
        fused.load_state_dict(ref.state_dict())
    return ref, fused


def inputs(family: str, padding=None, packed=False):
    torch.manual_seed(1)
    if family == "vit":
        return dict(pixel_values=torch.randn(3, 3, 16, 16), labels=torch.tensor([0, 3, 4]))
    vocab = 61 if family in LLAMA_FAMILIES else 97
    ids = torch.randint(1, vocab, (2, 12))
    batch = dict(input_ids=ids, labels=ids.clone())
    if padding:
        mask = torch.ones_like(ids)
        mask[0, :4] = 0  # left padding
        batch["attention_mask"] = mask
        batch["labels"] = ids.masked_fill(mask == 0, -100)
        batch["labels"][0, 4] = -100  # predicted from a fully padded row: implementation-defined
        batch["input_ids"] = ids.masked_fill(mask == 0, 0)
    if packed:  # two sequences packed in each row (position_ids restart), as DataCollatorWithFlattening builds
        batch["position_ids"] = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, 12)
    return batch


def step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_same_step(ref, fused, batch, rtol=2e-4):
    loss_ref, g_ref = step(ref, batch)
    loss, g = step(fused, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys()
    lora_grads = 0
    for name, want in g_ref.items():
        got = g[name]
        assert (got is None) == (want is None), f"{name}: gradient {'missing' if got is None else 'unexpected'}"
        if want is None:
            continue
        lora_grads += "lora_" in name
        err = (got - want).norm() / want.norm().clamp_min(1e-12)
        assert err < rtol, f"{name}: relative error {err:.2e}"
    assert lora_grads > 0


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2", "vit"])
def test_lora_all_linear_every_policy(family, policy):
    ref, fused = models(family, "all", policy, order=("after", "before")[list(POLICIES).index(policy) % 2])
    assert_same_step(ref, fused, inputs(family))


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "vit"])
def test_lora_qv_both_conversion_orders(family, order):
    ref, fused = models(family, "qv", "block", order)
    assert_same_step(ref, fused, inputs(family))


@pytest.mark.parametrize("policy", ["pointwise", "block"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lora_padding_and_packing(family, policy):
    ref, fused = models(family, "all", policy, "after")
    assert_same_step(ref, fused, inputs(family, padding=True))
    assert_same_step(ref, fused, inputs(family, packed=True))


@pytest.mark.parametrize("policy", list(POST_LN_POLICIES))
@pytest.mark.parametrize("family", ENCODERS)
def test_lora_encoders_every_policy_with_padding(family, policy, fused_calls):
    """BERT, DistilBERT (post-LN) and ModernBERT (pre-LN, GeGLU from one Wi, LoRA on the packed Wqkv and Wi): every
    linear adapted, left-padded batch (the key ids path) and no padding, both conversion orders; the fused path ran on
    every layer."""
    order = ("after", "before")[list(POST_LN_POLICIES).index(policy) % 2]
    ref, fused = models(family, "all", policy, order)
    for padding in (False, True):
        fused_calls.clear()
        assert_same_step(ref, fused, inputs(family, padding=padding))
        assert len(fused_calls) == 2


def test_lora_rslora_and_bias_modes():
    for bias in ("none", "lora_only", "all"):
        ref, fused = models("qwen2", "all", "block", "after", use_rslora=True, bias=bias)
        assert_same_step(ref, fused, inputs("qwen2"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_dropout_masks_replayed(family):
    """lora_dropout 0.1 (PEFT's masks come from torch's RNG, ours from the block seed, so the two models cannot be
    compared step for step): every policy gives the same step under one seed, and the step differs from p = 0."""
    results = []
    for policy in POLICIES:
        _, fused = models(family, "all", policy, "after", dropout=0.1)
        torch.manual_seed(11)
        results.append(step(fused, inputs(family)))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        for name, g in grads.items():
            if g is not None:
                torch.testing.assert_close(g, results[0][1][name], rtol=1e-4, atol=1e-6)
    _, no_drop = models(family, "all", "block", "after")
    assert not torch.allclose(step(no_drop, inputs(family))[0], results[0][0])


def test_disable_set_adapter_and_merge_match_peft():
    ref, fused = models("llama", "all", "block", "after")
    batch = inputs("llama")
    for model in (ref, fused):
        model.add_adapter("second", _lora_config("llama", "qv"))
        _randomize_b(model)
    fused.load_state_dict(ref.state_dict())
    with ref.disable_adapter(), fused.disable_adapter():
        torch.testing.assert_close(fused(**batch).loss, ref(**batch).loss)
    for model in (ref, fused):
        model.set_adapter("second")
    assert_same_step(ref, fused, batch)
    merged_ref, merged = ref.merge_and_unload(), fused.merge_and_unload()
    for p in (*merged_ref.parameters(), *merged.parameters()):
        p.requires_grad_(True)
    loss_ref, g_ref = step(merged_ref, batch)
    loss, g = step(merged, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for name, want in g_ref.items():
        torch.testing.assert_close(g[name], want, rtol=2e-4, atol=1e-6)


def test_lora_step_flops_not_above_unconverted():
    """No dW GEMM for the frozen base weights: a LoRA step of the converted model (pointwise: no recompute) counts no
    more matmul FLOPs than the unconverted PEFT model's step, but for LoRA's small z recompute."""
    ref, fused = models("llama", "all", "pointwise", "after")
    batch = inputs("llama")

    ours, theirs = matmul_flops(lambda: step(fused, batch)), matmul_flops(lambda: step(ref, batch))
    assert ours <= theirs * 1.03, (ours, theirs)  # + LoRA's z = drop(y)Aᵀ recomputed for dB (N·in·r)


def test_trainer_gradient_checkpointing_lora_20_steps(tmp_path):
    """Trainer with gradient_checkpointing=True and a LoRA model: the converted model's loss curve equals the
    unconverted one's, and every LoRA tensor moves."""
    torch.manual_seed(3)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(1, 61, (40, 12))]

    def train(convert: bool):
        model = peft.get_peft_model(_base("llama"), _lora_config("llama", "all"))
        _randomize_b(model)
        if convert:
            apply_fused_checkpointing(model, "block")
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        # Hugging Face's reentrant default fails with frozen embeddings ("element 0 of tensors does not require
        # grad"): the reference runs non-reentrant; the converted model trains with either (HF's flag is ignored)
        kwargs = {"use_reentrant": convert}
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(convert)), max_steps=20,
                                              per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
                                              gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs,
                                              report_to=[], save_strategy="no", use_cpu=True, seed=0,
                                              dataloader_num_workers=0)  # fmt: skip
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
        return losses, moved, start

    ref_losses, ref_moved, start = train(False)
    losses, moved, _ = train(True)
    assert len(losses) == 20
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    assert sorted(moved) == sorted(start), "every LoRA tensor must move"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_layers_lora_and_fused_loss_together(family):
    """apply_fused_checkpointing(..., fused_loss=True) on a PEFT model: fused LoRA layers and the fused LM head (found
    inside the PeftModel) give the unconverted PEFT model's loss and LoRA gradients, with logits None; remove undoes
    both."""
    from ckpt_ext.integrations.huggingface import remove_fused_checkpointing

    ref, fused = models(family, "all", "block", "after")
    apply_fused_checkpointing(fused, "block", fused_loss=True)
    batch = inputs(family)
    batch["labels"][0, :3] = -100
    out = fused(**batch)
    assert out.logits is None
    assert_same_step(ref, fused, batch)
    assert remove_fused_checkpointing(fused) == 2
    assert fused(**batch).logits is not None
    with pytest.raises(TypeError, match="fused_loss"):
        apply_fused_checkpointing(_base("vit"), "block", fused_loss=True)
