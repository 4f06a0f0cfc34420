"""``make demo`` / ``python -m bench.demo``: the seed article's "Checkpointing Strategy Comparison" table, measured.

Trains a small byte-level GPT, a Llama-style byte-level model (RMSNorm, SwiGLU, RoPE, GQA) and a BERT-style
byte-level masked LM (post-LN, bidirectional; training capped at FAMILY_SECONDS) (bench.demo_model) on the shipped
corpus (bench/data/corpus.txt) once per strategy,
from the same initial weights and on the same batches, and reports per strategy: activation memory kept by one forward
(and % saved vs no checkpointing), recompute FLOPs (× one forward), median step time (interleaved round-robin in one
run, × no checkpointing), tokens/s and the final loss (identical up to rounding: every strategy is exact). With
``--device cuda`` it adds the peak memory of a step and the largest batch that fits ``--budget``.

Writes <out>/strategies.md and .png (GPT), <out>/strategies_llama.md and .png, <out>/strategies_bert.md and .png
(``--family`` picks; all by default, "both": GPT and Llama), then <out>/batch_answer.md: the planner's largest batch at
T=1024 on 24 GiB for GPT-2 small and a Llama-3.2-1B-shaped model per strategy, with Hugging Face's and the fused LM
head, and <out>/batch_answer_bert.md: the same at T=512 for BERT-base (bench.demo_batch). The default
size finishes in about 6 minutes on 2 CPU cores (the batch tables add about half a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm import tqdm

import ckpt_ext
from ckpt_ext.backend import concrete_backend
from ckpt_ext.plan import positive_arg

from . import demo_batch, malloc_tuning
from . import demo_measure as measure
from .demo_corpus import load_corpus
from .demo_model import FAMILIES, STRATEGIES, build, check_strategies, label, make_strategy
from .demo_report import Row, plot, table, write_markdown
from .demo_roofline import describe, modeled_overhead

TITLE = "Checkpointing Strategy Comparison"
MODEL_NAMES = {"gpt": "byte-level GPT", "llama": "byte-level Llama-style (RMSNorm, SwiGLU, RoPE, GQA)",
               "bert": "byte-level BERT-style masked LM (post-LN, bidirectional)"}  # fmt: skip
FAMILY_SECONDS = {"bert": 40.0}  # the third table's training budget, so it adds well under a minute
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}  # fmt: skip


positive_int = positive_arg(int, "integer")


def memory_size(text: str) -> int:
    """'24GiB', '500MB', '1.5GiB' or plain bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 24GiB, 500MB or 1e9 bytes, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def strategy_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--strategies needs at least one name")
    try:
        return check_strategies(names)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """torch's CPU thread count set to ``n`` (0: unchanged) for the block, restored after."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """``--threads`` (torch CPU threads), shared with bench.microbench."""
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 keeps CPU timings stable when cores are shared (OpenMP threads stall waiting for "
        "a descheduled sibling), 0 = torch's default",
    )


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Errors out on a bad --threads, --heads not dividing --d-model, or an unknown/unavailable --device."""
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.d_model % args.heads:
        parser.error(f"--heads {args.heads} must divide --d-model {args.d_model}")
    if not args.device.startswith(("cpu", "cuda")):
        parser.error(f"--device must be cpu or cuda[:i], got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch (torch.cuda.is_available() is False)")


SHAPE_OPTIONS = (  # flag, default, help
    ("--batch", 4, "sequences per step (B)"),
    ("--seq", 256, "sequence length (T; bytes for the demo)"),
    ("--d-model", 256, "model width (d)"),
    ("--heads", 4, "attention heads, must divide --d-model (h)"),
)


def new_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The bench command lines' parser (``python -m bench.<module>``, defaults shown in --help) with the model-shape
    options both the demo and the microbenchmark take: --batch, --seq, --d-model, --heads."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{module}", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    for flag, default, text in SHAPE_OPTIONS:
        p.add_argument(flag, type=positive_int, default=default, help=text)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(
        "demo",
        "Measure activation checkpointing strategies on a small byte-level GPT: activation memory kept, "
        "recompute FLOPs, step time, tokens/s and final loss, side by side in one run.",
    )
    p.add_argument("--layers", type=positive_int, default=6, help="transformer blocks")
    p.add_argument("--steps", type=positive_int, default=16, help="training steps per strategy (first is warm-up)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    p.add_argument(
        "--strategies",
        type=strategy_list,
        default=list(STRATEGIES),
        help="comma-separated, from: " + ", ".join(STRATEGIES) + " ('none' is always added as the baseline)",
    )
    p.add_argument("--family", default="all", choices=(*FAMILIES, "both", "all"),
                   help="model family (all: one table each; both: gpt and llama)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]; cuda adds peak memory and max batch per budget")
    p.add_argument("--budget", type=memory_size, default="24GiB", help="memory budget for the max-batch search (cuda)")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for strategies.md and strategies.png")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the batch order")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="wall-clock budget: training stops early (same steps for every strategy) when the next round would end "
        "past it; 0 disables",
    )
    add_threads_option(p)
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    p.add_argument(
        "--no-batch-answer",
        action="store_true",
        help="skip the planner's max-batch tables (GPT-2 small, Llama-3.2-1B at T=1024; BERT-base at T=512)",
    )
    return p


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    if args.lr <= 0 or not math.isfinite(args.lr):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.max_seconds < 0 or not math.isfinite(args.max_seconds):
        parser.error(f"--max-seconds must be >= 0, got {args.max_seconds}")
    if "none" not in args.strategies:
        args.strategies = ["none", *args.strategies]
    return args


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform's guess, with the core count."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def versions(device: str) -> dict[str, str]:
    dev = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name()
    return {
        "device": f"{device} ({dev})",
        "ckpt_ext backend": f"{ckpt_ext.get_backend()} -> {concrete_backend(torch.device(device).type)}",
        "versions": f"ckpt_ext {ckpt_ext.__version__}, torch {torch.__version__}, python {platform.python_version()}",
        "platform": platform.platform(),
    }


def run(args: argparse.Namespace, family: str = "gpt") -> dict:
    """Measure every strategy; returns {"rows": [Row], "losses"/"seconds": {name: [per step]}, "steps", "elapsed"}."""
    started = time.perf_counter()
    device, names = args.device, args.strategies
    torch.manual_seed(args.seed)
    base = build(family, args.layers, args.d_model, args.heads, args.seq)
    batches = measure.make_batches(load_corpus(), args.steps, args.batch, args.seq, args.seed, device)
    models = {n: make_strategy(base, n).to(device) for n in names}

    bar = tqdm(total=len(names) * (args.steps + 2), desc="measure", unit="step", disable=args.no_progress)
    kept, flops = {}, {}
    fwd_flops = measure.forward_flops(models["none"], batches[0])
    for n in names:
        bar.set_postfix_str(n)
        kept[n] = measure.activation_bytes(models[n], batches[0])
        bar.update()
        flops[n] = measure.step_flops(models[n], batches[0])
        bar.update()
    bar.set_description("train")
    bar.set_postfix_str("round-robin")
    trainers = {n: measure.Trainer(models[n], args.lr, device) for n in names}
    seconds_cap = min(args.max_seconds, FAMILY_SECONDS.get(family, math.inf)) if args.max_seconds > 0 else 0
    deadline = started + seconds_cap if seconds_cap > 0 else None
    losses, seconds = measure.train_round_robin(trainers, batches, on_step=bar.update, deadline=deadline)
    bar.close()
    steps_run = len(losses["none"])

    steps_s = {n: measure.median_step(seconds[n]) for n in names}
    peaks: dict[str, Optional[int]] = {}
    max_batch: dict[str, Optional[int]] = {}
    if device.startswith("cuda"):
        del trainers, models
        for n in tqdm(names, desc="cuda max batch", disable=args.no_progress):
            factory = lambda n=n: make_strategy(base, n)  # noqa: E731
            peaks[n] = measure.cuda_step_peak(factory, args.batch, args.seq, device)
            max_batch[n] = measure.largest_batch(factory, args.seq, args.budget, device, start=args.batch)

    rows = []
    base_loss = losses["none"][-1]
    for n in names:
        rows.append(
            Row(
                name=n,
                label=label(n),
                act_bytes=kept[n],
                saved_pct=100.0 * (1.0 - kept[n] / kept["none"]) if kept["none"] else 0.0,
                recompute_x=(flops[n] - flops["none"]) / fwd_flops,
                step_s=steps_s[n],
                step_x=steps_s[n] / steps_s["none"],
                tokens_per_s=args.batch * args.seq / steps_s[n],
                final_loss=losses[n][-1],
                loss_rel_diff=abs(losses[n][-1] - base_loss) / abs(base_loss),
                modeled_x=modeled_overhead(n, args.layers, family),
                peak_bytes=peaks.get(n),
                max_batch=max_batch.get(n),
            )
        )
    return dict(rows=rows, losses=losses, seconds=seconds, steps=steps_run, elapsed=time.perf_counter() - started)


def notes(args: argparse.Namespace, rows: list[Row], steps: int, elapsed: float, family: str = "gpt") -> list[str]:
    out = [
        "Activations kept: bytes the autograd graph holds after one forward (tokens -> loss), measured with "
        "ckpt_ext.measure.retained_activation_bytes; weights, gradients and optimizer state excluded.",
        "Recompute: FLOPs of one training step minus the baseline's, in units of one forward of the whole model "
        "(FlopCounterMode, recompute inside backward included).",
        f"Step time: median of {max(steps - 1, 1)} training steps (forward, backward, AdamW) per strategy, "
        "interleaved round-robin in one run; tokens/s = batch × seq / step time.",
        f"Final loss after {steps} steps on identical weights and batches; every strategy computes the same "
        f"math, so losses differ only by float rounding (largest relative difference "
        f"{max(r.loss_rel_diff for r in rows):.1e}).",
    ]
    if any(r.modeled_x is not None for r in rows):
        out.append(f"H200 model: ckpt_ext.roofline step time of one block in bf16, × no checkpointing, priced at a "
                   f"realistic shape of the same family, {describe(family)} (at this demo's width every op would sit "
                   f"at the model's launch floor); every-k-th rows use this run's {args.layers} layers.")  # fmt: skip
    else:
        out.append("H200 model column omitted: the roofline cost model (ckpt_ext.roofline) is not available.")
    if args.device.startswith("cuda"):
        out.append(
            "Peak memory: torch.cuda.max_memory_allocated over one training step of a fresh model (weights, "
            f"gradients, AdamW state, activations); max batch: largest batch whose step peaks ≤ {args.budget:,} bytes "
            "(doubling, then bisection, OOM counted as not fitting)."
        )
    elif torch.device(args.device).type == "cpu":
        out.append("On CPU the fused ops run the C++ backend (`auto`); CPU step times need not carry over to a GPU.")
    if steps < args.steps:
        cap = min(args.max_seconds, FAMILY_SECONDS.get(family, math.inf))
        why = f"--max-seconds {args.max_seconds:g}" if cap == args.max_seconds else f"this table's {cap:g} s budget"
        out.append(f"Training stopped after {steps} of {args.steps} steps: {why} reached.")
    out.append(f"Total run time {elapsed:.0f} s.")
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the demo for each chosen family; returns the last family's result (with "table"), all under "families"."""
    args = parse_args(argv)
    malloc = malloc_tuning.describe(malloc_tuning.keep_freed_memory())
    families = {"all": FAMILIES, "both": ("gpt", "llama")}.get(args.family, (args.family,))
    results = {}
    for family in families:
        with cpu_threads(args.threads):
            result = run(args, family)
        results[family] = result
        rows = result["rows"]
        model = MODEL_NAMES[family]
        shape = f"{args.layers} layers, d={args.d_model}, {args.heads} heads, T={args.seq}, batch {args.batch}"
        md_table = table(rows, cuda=args.device.startswith("cuda"), budget=args.budget)
        note_lines = notes(args, rows, result["steps"], result["elapsed"], family)
        config = {"model": f"{model}, {shape}", "steps": f"{result['steps']} of {args.steps}", "lr": args.lr,
                  "seed": args.seed, "torch threads": args.threads or torch.get_num_threads(), "malloc": malloc,
                  "strategies": ", ".join(args.strategies), **versions(args.device)}  # fmt: skip
        stem = "strategies" if family == "gpt" else f"strategies_{family}"
        title = f"{TITLE}: {model}"
        args.out.mkdir(parents=True, exist_ok=True)
        write_markdown(args.out / f"{stem}.md", title, md_table, config, note_lines)
        plot(args.out / f"{stem}.png", rows, f"{title} ({shape}, {args.device})")
        sys.stdout.write(f"\n{title} ({shape}, {args.device})\n\n{md_table}\n\n")
        sys.stdout.write("\n".join(f"- {n}" for n in note_lines) + "\n")
        sys.stdout.write(f"\nwrote {args.out / (stem + '.md')} and {args.out / (stem + '.png')}\n")
        result["table"] = md_table
    result = dict(results[families[-1]])
    result["families"] = results
    if not args.no_batch_answer:
        answer_kinds = (
            ("batch_answer", "batch_answer.md", demo_batch.reports, demo_batch.markdown),
            ("batch_answer_encoders", "batch_answer_bert.md", demo_batch.encoder_reports, demo_batch.encoder_markdown),
        )
        for key, filename, reports, markdown in answer_kinds:
            answers = reports()
            if answers:
                text = markdown(answers)
                (args.out / filename).write_text(text, encoding="utf-8")
                sys.stdout.write(f"\n{text}\nwrote {args.out / filename}\n")
            result[key] = answers
    return result


if __name__ == "__main__":
    main()
