"""Hugging Face post-LN encoders (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT) converted by apply_fused_checkpointing
match the unconverted models.

Tiny models built from configs (hidden 64, 2 layers, no downloads). fp32, dropout 0: loss and every parameter gradient
agree for every policy × padding (none, right, all but one token) × token_type_ids, eager and SDPA attention; with
dropout the same seed replays the same run; eval, no_grad, output_attentions, head_mask, relative positions and
DistilBERT's FFN-only dropout run the original forward; bf16 autocast stays within a few times Hugging Face's own
bf16 error; the padding mask reaches the kernels as (B, T) key ids; torch.compile(fullgraph=True) of a converted BERT
with and without a padding mask equals eager, and a batch row of only padding raises there (eager: original forward).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers  # noqa: E402  (make test installs it: missing, this file fails)

from ckpt_ext.integrations import hf_common
from ckpt_ext.integrations.huggingface import apply_fused_checkpointing, remove_fused_checkpointing  # noqa: E402
from ckpt_ext.policies import POST_LN_POLICIES  # noqa: E402

from helpers import assert_step_within_bf16_error

V, D, LAYERS, T = 53, 64, 2, 10
FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
_CONFIGS = {"bert": "BertConfig", "roberta": "RobertaConfig", "xlm-roberta": "XLMRobertaConfig",
            "electra": "ElectraConfig"}  # fmt: skip
_PREFIX = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "electra": "Electra",
           "distilbert": "DistilBert"}  # fmt: skip
HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "Model")


def make(family: str, head: str = "ForMaskedLM", impl: str = "eager", p: float = 0.0, **overrides):
    if family == "distilbert":
        kw = dict(vocab_size=V, dim=D, n_layers=LAYERS, n_heads=4, hidden_dim=96, dropout=p, attention_dropout=p,
                  max_position_embeddings=32, seq_classif_dropout=0.0, qa_dropout=0.0, pad_token_id=0)  # fmt: skip
        cfg = transformers.DistilBertConfig(**{**kw, **overrides})
    else:
        kw = dict(vocab_size=V, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=96,
                  hidden_dropout_prob=p, attention_probs_dropout_prob=p, max_position_embeddings=40, pad_token_id=1,
                  classifier_dropout=0.0)  # fmt: skip
        cfg = getattr(transformers, _CONFIGS[family])(**{**kw, **overrides})
    cfg._attn_implementation = impl
    return getattr(transformers, _PREFIX[family] + head)(cfg).train()


def batch(family: str, padding, types: bool = True):
    ids = torch.randint(2, V, (3, T))
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, 6:] = 0
    elif padding == "one":  # all but one token padded
        mask[2, 1:] = 0
    inputs = dict(input_ids=ids, attention_mask=None if padding is None else mask)
    if types and family != "distilbert":
        inputs["token_type_ids"] = (torch.arange(T) >= T // 2).long().expand(3, T)
    return inputs


def loss_of(model, inputs: dict, head: str = "ForMaskedLM"):
    out = model(**inputs)
    if head == "ForQuestionAnswering":
        return out.start_logits.square().mean() + out.end_logits.cos().mean()
    if head == "Model":
        return out.last_hidden_state.sin().mean()
    return out.logits.sin().mean()


def step(model, inputs: dict, head: str = "ForMaskedLM"):
    model.zero_grad(set_to_none=True)
    loss = loss_of(model, inputs, head)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(grads: dict, grads_ref: dict, rtol=1e-4, atol=1e-5):
    assert grads.keys() == grads_ref.keys()
    scale = max(g.abs().max() for g in grads_ref.values())
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=rtol, atol=atol * scale, msg=lambda m, n=name: f"{n}: {m}")


def fused_copy(model, policy: str = "block"):
    fused = copy.deepcopy(model)
    assert apply_fused_checkpointing(fused, policy) == LAYERS
    return fused


@pytest.mark.parametrize("padding", [None, "right", "one"])
@pytest.mark.parametrize("policy", list(POST_LN_POLICIES))
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_grads_match(family, policy, padding, fused_calls):
    """Every family × policy × padding; attention implementation alternates with the policy (ELECTRA: eager only in
    4.57), so both implementations meet every family and every padding."""
    impl = "eager" if family == "electra" or list(POST_LN_POLICIES).index(policy) % 2 == 0 else "sdpa"
    ref = make(family, impl=impl)
    fused = fused_copy(ref, policy)
    inputs = batch(family, padding)
    loss_ref, grads_ref = step(ref, inputs)
    loss, grads = step(fused, inputs)
    assert len(fused_calls) == LAYERS
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, grads_ref)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_head_converts_and_matches(family, head, fused_calls):
    ref = make(family, head)
    fused = fused_copy(ref, "ffn")
    inputs = batch(family, "right", types=False)
    loss_ref, grads_ref = step(ref, inputs, head)
    loss, grads = step(fused, inputs, head)
    assert len(fused_calls) == LAYERS
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, grads_ref)


def test_state_dict_unchanged_and_removable():
    ref = make("bert")
    fused = copy.deepcopy(ref)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    params = {n: p.data_ptr() for n, p in fused.named_parameters()}
    apply_fused_checkpointing(fused, "block")
    after = fused.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert {n: p.data_ptr() for n, p in fused.named_parameters()} == params  # no copies
    assert {type(layer).__name__ for layer in fused.bert.encoder.layer} == {"FusedBertLayer"}
    assert remove_fused_checkpointing(fused) == LAYERS
    assert {type(layer).__name__ for layer in fused.bert.encoder.layer} == {"BertLayer"}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_dropout_same_seed_replays(impl, fused_calls):
    """Dropout 0.1 on the probabilities and both residual branches: two runs under one seed (different policies) agree
    exactly; in eval the converted model equals the unconverted one."""
    ref = make("bert", impl=impl, p=0.1)
    inputs = batch("bert", "right")
    runs = []
    for policy in ("none", "block", "block"):
        model = fused_copy(ref, policy)
        torch.manual_seed(7)
        runs.append(step(model, inputs))
    assert len(fused_calls) == 3 * LAYERS
    for loss, grads in runs[1:]:
        torch.testing.assert_close(loss, runs[0][0], rtol=0, atol=0)
        for name, g in runs[0][1].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)
    torch.manual_seed(8)
    other = step(fused_copy(ref, "block"), inputs)[0]
    assert other != runs[0][0]  # the dropout really draws from the seed
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loss_of(model, inputs), loss_of(ref.eval(), inputs), rtol=0, atol=0)


def test_eval_no_grad_output_attentions_fall_back(fused_calls, caplog):
    ref = make("bert")
    fused = fused_copy(ref)
    inputs = batch("bert", "right")
    with torch.no_grad():
        torch.testing.assert_close(loss_of(fused, inputs), loss_of(ref, inputs), rtol=0, atol=0)
    assert fused_calls == []
    fused.eval()  # eval with grad: fused, dropout off
    ref.eval()
    torch.testing.assert_close(step(fused, inputs)[0], step(ref, inputs)[0], rtol=1e-5, atol=1e-6)
    assert len(fused_calls) == LAYERS
    fused_calls.clear()
    fused.train()
    ref.train()
    # after this, transformers 5.x keeps its output recorders hooked on attention.self (idle in later calls)
    with caplog.at_level(logging.WARNING, logger="ckpt_ext.integrations"):
        out = fused(**inputs, output_attentions=True)
        out_ref = ref(**inputs, output_attentions=True)
    assert fused_calls == [] and len(out.attentions) == LAYERS
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=0, atol=0)
    head_mask = torch.ones(LAYERS, 4)
    with caplog.at_level(logging.WARNING, logger="ckpt_ext.integrations"):
        out = fused(**inputs, head_mask=head_mask).logits
    assert fused_calls == []
    torch.testing.assert_close(out, ref(**inputs, head_mask=head_mask).logits, rtol=0, atol=0)
    # later calls fuse again: 5.x's recorders left on the submodules are idle; output_hidden_states records the
    # layers' own outputs, which the fused layers still return
    (loss, grads), (loss_ref, grads_ref) = step(fused, inputs), step(ref, inputs)
    assert len(fused_calls) == LAYERS
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, grads_ref)
    fused_calls.clear()
    out, out_ref = fused(**inputs, output_hidden_states=True), ref(**inputs, output_hidden_states=True)
    assert len(fused_calls) == LAYERS and len(out.hidden_states) == LAYERS + 1
    for h, h_ref in zip(out.hidden_states, out_ref.hidden_states):
        torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


def test_relative_positions_fall_back_with_a_warning(fused_calls, caplog):
    ref = make("bert", position_embedding_type="relative_key")
    fused = fused_copy(ref)
    inputs = batch("bert", "right")
    with caplog.at_level(logging.WARNING, logger="ckpt_ext.integrations"):
        loss, grads = step(fused, inputs)
    loss_ref, grads_ref = step(ref, inputs)
    if int(transformers.__version__.split(".")[0]) >= 5:  # 5.x dropped relative positions: the field is ignored
        assert len(fused_calls) == LAYERS
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        return
    assert fused_calls == []
    assert "position_embedding_type='relative_key'" in caplog.text
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)


def test_distilbert_dropout_falls_back_then_fuses_without_it(fused_calls, caplog):
    """DistilBERT drops only the FFN output: training with dropout > 0 runs the original forward (warned); its
    attention-probability dropout alone is fused."""
    model = fused_copy(make("distilbert", p=0.1))
    with caplog.at_level(logging.WARNING, logger="ckpt_ext.integrations"):
        step(model, batch("distilbert", "right"))
    assert fused_calls == [] and "residual branches" in caplog.text
    model = fused_copy(make("distilbert", p=0.0, attention_dropout=0.1))
    step(model, batch("distilbert", "right"))
    assert len(fused_calls) == LAYERS


def test_fully_padded_row_falls_back(fused_calls):
    """A batch row with no key: Hugging Face's softmax over finfo.min gives uniform weights, the kernels zeros."""
    ref = make("bert")
    fused = fused_copy(ref)
    inputs = batch("bert", "right")
    inputs["attention_mask"][0] = 0
    loss_ref, grads_ref = step(ref, inputs)
    loss, grads = step(fused, inputs)
    assert fused_calls == []
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, match",
    [(dict(hidden_act="relu"), "hidden_act"), (dict(is_decoder=True), "is_decoder")],
)
def test_unsupported_config_is_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        apply_fused_checkpointing(make("bert", **overrides))
    with pytest.raises(ValueError, match="activation"):
        apply_fused_checkpointing(make("distilbert", activation="relu"))


def test_gelu_new_activation_matches(fused_calls):
    ref = make("roberta", hidden_act="gelu_new")
    fused = fused_copy(ref)
    inputs = batch("roberta", "one")
    loss_ref, grads_ref = step(ref, inputs)
    loss, grads = step(fused, inputs)
    assert len(fused_calls) == LAYERS
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, grads_ref)


def test_bf16_autocast_close_to_hugging_face(fused_calls):
    ref = make("bert", impl="sdpa")
    fused = fused_copy(ref)
    inputs = batch("bert", "right")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, grads_ref = step(ref, inputs)
        loss, grads = step(fused, inputs)
    assert len(fused_calls) == LAYERS
    assert_step_within_bf16_error((loss, grads), (loss_ref, grads_ref), step(copy.deepcopy(ref).double(), inputs))


@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padding_reaches_the_kernels_as_key_ids(family, impl, fused_calls):
    """The padding mask reaches fused_block as (B, T) int32 key ids (1 kept, -1 padded), never as a mask tensor."""
    model = fused_copy(make(family, impl=impl))
    inputs = batch(family, "right")
    loss_of(model, inputs).backward()
    expected = torch.where(inputs["attention_mask"] > 0, 1, -1).int()
    assert len(fused_calls) == LAYERS
    for call in fused_calls:
        attn_mask, segment_ids = call[3], call[5]
        assert attn_mask is None
        assert segment_ids.dtype == torch.int32 and torch.equal(segment_ids, expected)


def _compile_inputs(impl: str, padding):
    """The encoder's hidden states and the 4-D mask BertModel builds for ``impl`` from a 2-D padding mask."""
    from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask, _prepare_4d_attention_mask_for_sdpa

    x = torch.randn(3, T, D)
    if padding is None:
        return x, None
    keep = torch.ones(3, T, dtype=torch.long)
    keep[1, 6:] = 0
    if padding == "empty-row":
        keep[2] = 0
    build = _prepare_4d_attention_mask_for_sdpa if impl == "sdpa" else _prepare_4d_attention_mask
    return x, build(keep, torch.float32, tgt_len=T)


@pytest.mark.parametrize("impl, padding", [("sdpa", None), ("sdpa", "right"), ("eager", "right")])
def test_fullgraph_compile_matches_eager(impl, padding, fused_calls):
    """torch.compile(fullgraph=True) of a converted BERT encoder stack, with and without a padding mask (as eager
    BERT's (B, 1, 1, T) and SDPA's materialized (B, 1, T, T) masks), equals the eager converted and unconverted
    stacks: the mask checks are device assertions there, so nothing breaks the graph."""
    torch._dynamo.reset()
    ref = make("bert", impl=impl)
    model = fused_copy(ref)
    x, mask = _compile_inputs(impl, padding)

    def loss_fn(m):
        return m.bert.encoder(x, attention_mask=mask).last_hidden_state.sin().mean()

    def run(fn, m):
        m.zero_grad(set_to_none=True)
        loss = fn(m)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    eager = run(loss_fn, model)
    unconverted = run(loss_fn, ref)
    compiled = run(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"), model)
    assert len(fused_calls) == 2 * LAYERS  # eager, and traced once
    for expected in (eager, unconverted):
        torch.testing.assert_close(compiled[0], expected[0], rtol=1e-5, atol=1e-6)
        assert_grads_close(compiled[1], expected[1])
    torch._dynamo.reset()


def test_compiled_batch_row_of_only_padding_raises(fused_calls, caplog, monkeypatch):
    """A batch row with no kept token: eager runs the original forward (Hugging Face gives it uniform weights, the
    kernels zeros), warned; compiled, where the mask cannot be read, the device assertion raises naming the case."""
    torch._dynamo.reset()
    ref = make("bert", impl="sdpa")
    model = fused_copy(ref)
    x, mask = _compile_inputs("sdpa", "empty-row")
    monkeypatch.setattr(hf_common, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="ckpt_ext.integrations"):
        out = model.bert.encoder(x, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref.bert.encoder(x, attention_mask=mask).last_hidden_state)
    assert fused_calls == [] and "leaves a batch row no key" in caplog.text
    compiled = torch.compile(lambda: model.bert.encoder(x, attention_mask=mask).last_hidden_state, fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    with pytest.raises(RuntimeError, match="leaves a batch row no key"):
        compiled()
    torch._dynamo.reset()


def test_deberta_is_refused_clearly():
    """DeBERTa-v2/v3 (disentangled attention) is out of scope: a TypeError naming the model and the supported
    families, nothing converted."""
    cfg = transformers.DebertaV2Config(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64)  # fmt: skip
    model = transformers.DebertaV2ForMaskedLM(cfg)
    with pytest.raises(TypeError, match="DebertaV2ForMaskedLM has no supported transformer layers.*BERT, RoBERTa"):
        apply_fused_checkpointing(model, "block")


def test_trainer_sequence_classification_with_padding_20_steps(tmp_path, fused_calls):
    """transformers.Trainer fine-tunes BertForSequenceClassification on variable-length examples padded per batch by
    DataCollatorWithPadding, gradient_checkpointing=True (ignored by the converted layers: no double recompute): the
    converted model's loss curve equals the unconverted one's over 20 steps, and the fused path ran on every step."""
    torch.manual_seed(4)
    data = []
    for n in torch.randint(3, T + 1, (40,)).tolist():
        data.append({"input_ids": torch.randint(2, V, (n,)).tolist(), "label": int(torch.randint(0, 2, ()))})

    class Tokens:  # what DataCollatorWithPadding needs of a tokenizer: pad with attention_mask
        model_input_names = ["input_ids", "attention_mask"]
        padding_side = "right"
        pad_token_id = 0

        def pad(self, features, padding=True, max_length=None, pad_to_multiple_of=None, return_tensors="pt"):
            width = max(len(f["input_ids"]) for f in features)
            ids = torch.zeros(len(features), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, f in enumerate(features):
                ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
                mask[i, : len(f["input_ids"])] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["label"] for f in features])}

    def train(convert: bool):
        torch.manual_seed(0)
        model = make("bert", head="ForSequenceClassification", impl="sdpa")
        if convert:
            apply_fused_checkpointing(model, "block")
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(convert)), max_steps=20,
                                              per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
                                              gradient_checkpointing=True, report_to=[], save_strategy="no",
                                              use_cpu=True, seed=0, dataloader_num_workers=0)  # fmt: skip
        collator = transformers.DataCollatorWithPadding(Tokens())
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    ref_losses = train(False)
    assert fused_calls == []
    losses = train(True)
    assert len(losses) == 20 and len(fused_calls) == 20 * LAYERS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
