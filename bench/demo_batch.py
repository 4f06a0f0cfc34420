"""The seed's batch question answered by the planner: the largest batch at T=1024 on a 24 GiB GPU for GPT-2 small and
a Llama-3.2-1B-shaped model, per checkpointing strategy, with Hugging Face's LM head and with the fused head; and at
T=512 for BERT-base (BertForMaskedLM; Hugging Face's masked-LM head only: the fused loss serves causal LMs).

The configs are built from the models' published sizes (no hub download): GPT-2 small (d=768, 12 layers, 12 heads,
V=50257, tied, dropout 0.1 as shipped) and Llama-3.2-1B (d=2048, 16 layers, 32 heads of 64, 8 kv heads, SwiGLU
8192, V=128256, tied). Training setup: fp32 weights, bf16 autocast, AdamW (Hugging Face Trainer's bf16=True), full
fine-tuning; for the 1B model also LoRA r=16 on every linear layer of the blocks. BERT-base is bert-base-uncased's
config (d=768, 12 layers, 12 heads, MLP 3072, V=30522, 512 positions, dropout 0.1 as shipped), the post-LN layers
priced with the post-LN policy table. Everything is modeled
(ckpt_ext.planner_fit; tests/test_plan_hf.py checks the memory model against CPU training steps).
Seed article: "fitting batch sizes of 64-96 instead of 24-32 on a single 24GB GPU" for BERT or GPT variants.
"""

from __future__ import annotations

SEED_CLAIM = "seed article: batch 24-32 without checkpointing → 64-96 with it (BERT/GPT variants, 24 GB GPU)"


def gpt2_small():
    from transformers import GPT2Config

    return GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)


def llama_3_2_1b():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                       max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                       rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})  # fmt: skip


def bert_base():
    from transformers import BertConfig

    return BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)  # fmt: skip


ENCODER_SEQ = 512
ENCODER_CASES = (("BERT-base (110M), masked-LM full fine-tuning", bert_base, {}),)
CASES = (
    ("GPT-2 small (124M), full fine-tuning", gpt2_small, {}),
    ("Llama-3.2-1B-shaped (1.24B), full fine-tuning", llama_3_2_1b, {}),
    ("Llama-3.2-1B-shaped (1.24B), LoRA r=16 on all linear layers", llama_3_2_1b, {"lora_rank": 16}),
)


def reports(seq: int = 1024, budget: str = "24GiB", cases=None) -> list[tuple[str, object]]:
    """(title, planner_fit.ModelReport) per case; [] when transformers is not installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return []
    from ckpt_ext.planner_fit import plan_model

    cases = CASES if cases is None else cases
    return [(title, plan_model(make(), seq_len=seq, memory_budget=budget, **setup)) for title, make, setup in cases]


def encoder_reports(seq: int = ENCODER_SEQ, budget: str = "24GiB") -> list[tuple[str, object]]:
    """(title, planner_fit.ModelReport) per encoder case (one row per strategy: no fused head); [] without
    transformers."""
    return reports(seq, budget, ENCODER_CASES)


def table(report) -> str:
    """Markdown: one row per strategy, max batch and peak with each head, modeled overhead."""

    def gib(n: int) -> str:
        return f"{n / 2**30:.1f} GiB"

    base = report.row("no checkpointing", "hf").answer
    lines = ["| Strategy | Max batch, HF head | Max batch, fused head | × no ckpt (HF) | Peak at max (HF / fused) | "
             "Modeled overhead (HF / fused) |", "|---|---|---|---|---|---|"]  # fmt: skip
    labels = list(dict.fromkeys(r.label for r in report.rows))
    for label in labels:
        hf, fused = report.row(label, "hf"), report.row(label, "fused")
        ratio = f"{hf.answer / base:.1f}×" if base else "-"
        lines.append(f"| {label} | {hf.answer} | {fused.answer} | {ratio} | {gib(hf.peak_bytes)} / "
                     f"{gib(fused.peak_bytes)} | {hf.overhead:+.1%} / {fused.overhead:+.1%} |")  # fmt: skip
    return "\n".join(lines)


def markdown(results: list[tuple[str, object]], seq: int = 1024, budget: str = "24GiB") -> str:
    out = [f"# How big a batch fits: T={seq}, {budget} (modeled by ckpt_ext.plan)", "", SEED_CLAIM, ""]
    for title, report in results:
        spec = report.spec
        out += [f"## {title}", "", f"{spec.describe()}; {spec.setup.describe()}; model state "
                f"{spec.state_bytes / 2**30:.1f} GiB.", "", table(report), ""]  # fmt: skip
    out += ["HF head: lm_head + ForCausalLMLoss (bf16 logits held by the output, fp32 log-probs); fused head: "
            "chunked linear + cross-entropy keeping fp32 logsumexp only (256 MiB chunk budget). Overhead: modeled "
            "H200 time at B·T ≈ 8192 tokens vs no checkpointing with the HF head.", ""]  # fmt: skip
    return "\n".join(out)


def encoder_table(report) -> str:
    """Markdown for a model with one head: max batch, × no checkpointing, peak at max, modeled overhead."""
    base = report.row("no checkpointing", "hf").answer
    lines = ["| Strategy | Max batch | × no ckpt | Peak at max | Activations at max | Modeled overhead |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in report.rows:
        ratio = f"{r.answer / base:.1f}×" if base else "-"
        lines.append(f"| {r.label} | {r.answer} | {ratio} | {r.peak_bytes / 2**30:.1f} GiB | "
                     f"{r.activation_bytes / 2**30:.1f} GiB | {r.overhead:+.1%} |")  # fmt: skip
    return "\n".join(lines)


def seed_line(report) -> str:
    """The seed's "24-32 vs 64-96" beside the planner's answer: no checkpointing, torch checkpoint on every layer and
    the ckpt_ext policy that fits the largest batch, each with its modeled overhead."""
    base = report.row("no checkpointing", "hf").answer
    torch_every = report.row("torch checkpoint, every layer", "hf")
    best = max((r for r in report.rows if r.label.startswith("ckpt_ext ")), key=lambda r: (r.answer, -r.overhead))
    return (
        f"Seed: 24-32 without checkpointing vs 64-96 with it. Planner: {base} without; {torch_every.answer} with "
        f"torch checkpoint on every layer ({torch_every.overhead:+.1%} modeled); {best.answer} with "
        f"{best.label} ({best.overhead:+.1%})."
    )


def encoder_markdown(results: list[tuple[str, object]], seq: int = ENCODER_SEQ, budget: str = "24GiB") -> str:
    out = [f"# How big a batch fits: encoders, T={seq}, {budget} (modeled by ckpt_ext.plan)", "", SEED_CLAIM, ""]
    for title, report in results:
        spec = report.spec
        state = f"model state {spec.state_bytes / 2**30:.1f} GiB."
        out += [f"## {title}", "", f"{spec.describe()}; {spec.setup.describe()}; {state}", "",
                encoder_table(report), "", seed_line(report), ""]  # fmt: skip
    out += ["Head: Hugging Face's masked-LM head (dense, GELU, LayerNorm, tied decoder) with cross-entropy over every "
            "position (bf16 logits held by the output, fp32 log-probs). Overhead: modeled H200 time at B·T ≈ 8192 "
            "tokens vs no checkpointing.", ""]  # fmt: skip
    return "\n".join(out)
