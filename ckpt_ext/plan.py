"""``python -m ckpt_ext.plan``: the seed's strategy table for one model and memory budget, then the recommendation.

    python -m ckpt_ext.plan --d-model 1024 --layers 24 --heads 16 --seq 1024 --batch 32 --gpu-memory 24GiB
    python -m ckpt_ext.plan --config path/to/config.json --seq 1024 --gpu-memory 24GiB [--batch 8]

With ``--config`` (a Hugging Face config.json or its folder; GPT-2, Llama, Mistral, Qwen2, Qwen3, ViT, BERT) the table
has a "max batch" column (the largest batch at --seq; with --batch alone, "max seq": the longest sequence at that batch)
per strategy, each with Hugging Face's LM head and with the fused linear + cross-entropy head, beside activation
bytes, peak and modeled overhead; --param-dtype, --optimizer, --no-master-weights, --lora-rank, --lora-targets and
--drop-logits describe the training setup (planner_spec.py and planner_model.py state every assumption).

Rows: no checkpointing, torch.utils.checkpoint on every 4th / 2nd / every layer, each ckpt_ext policy on all layers;
columns: activation memory, peak (model state + activations + one layer's recompute workspace), modeled step-time
overhead vs. no checkpointing, fits. The recommendation is ``planner.plan(...)`` (a per-layer mix of policies).
The assumptions (bytes per value, 16 bytes of model state per parameter, roofline time model) are in planner.py.

Importing this module (rather than running it) makes the module itself callable as ``planner.plan``, so that
``ckpt_ext.plan(...)`` keeps working even after ``import ckpt_ext.plan`` rebinds the package attribute to the module.
"""

from __future__ import annotations

import argparse
import math
import sys
import types

from .planner import DTYPES, evaluate, gib, make_shape, parse_memory, plan, strategies


def table(d_model, n_layers, n_heads, seq_len, batch, memory_budget, dtype="bf16", mlp_ratio=4.0) -> str:
    shape = make_shape(d_model, n_layers, n_heads, seq_len, batch, dtype, mlp_ratio)
    budget = parse_memory(memory_budget)
    lines = [
        f"model: d_model={d_model}, {n_layers} layers, {n_heads} heads, seq {seq_len}, batch {batch}, {shape.dtype}, "
        f"mlp_ratio {mlp_ratio:g}; budget {gib(budget)}",
        f"model state (fp32 weights + grads + Adam, 16 B/param, embeddings excluded): {gib(shape.state_bytes)}",
        "",
        f"{'strategy':<34}{'activations':>14}{'peak':>14}{'overhead':>10}  fits",
    ]
    for label, kinds in strategies(shape):
        p = evaluate(shape, kinds, budget)
        lines.append(f"{label:<34}{gib(p.activation_bytes):>14}{gib(p.peak_bytes):>14}{p.overhead:>+10.1%}  "
                     f"{'yes' if p.fits else 'no'}")  # fmt: skip
    best = plan(d_model, n_layers, n_heads, seq_len, batch, budget, dtype, mlp_ratio)
    lines += ["", ("recommendation: " if best.fits else "") + best.message]
    if best.fits:
        note = "  (eager: leave the block unconverted)" if "eager" in best.policies else ""
        lines.append(f"layers: {best.layout()}{note}")
    return "\n".join(lines)


def positive_arg(kind, noun: str | None = None):
    """argparse type: a positive finite int or float (argparse names the option in its error; noun names the kind
    there, kind's own name by default). Also serves the bench command lines."""
    noun = noun or kind.__name__

    def read(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {text!r}")
        return value

    read.__name__ = kind.__name__
    return read


def _memory(text: str) -> int:
    try:
        return parse_memory(text, name="value")
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


VALUE_OPTIONS = ("--d-model", "--layers", "--heads", "--seq", "--batch", "--gpu-memory", "--dtype", "--mlp-ratio",
                 "--config", "--param-dtype", "--optimizer", "--lora-rank", "--lora-targets",
                 "--fused-chunk")  # fmt: skip


def _attach_values(argv: list[str]) -> list[str]:
    """``--gpu-memory -5GiB`` -> ``--gpu-memory=-5GiB``: argparse would read a value that starts with '-' as an
    option and report a missing value instead of what is wrong with the value."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] != "--":
            if argv[i + 1] not in VALUE_OPTIONS and argv[i + 1] not in ("-h", "--help"):
                out.append(f"{argv[i]}={argv[i + 1]}")
                i += 2
                continue
        out.append(argv[i])
        i += 1
    return out


def _optimizer(text: str):
    from .planner_spec import OPTIMIZERS

    if text in OPTIMIZERS:
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(OPTIMIZERS)} or bytes per parameter, "
                                         f"got {text!r}") from None  # fmt: skip
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected bytes per parameter >= 0, got {text!r}")
    return value


def _rank(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ckpt_ext.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="Hugging Face config.json (or its folder): plan the whole model")
    ap.add_argument("--d-model", type=positive_arg(int))
    ap.add_argument("--layers", type=positive_arg(int))
    ap.add_argument("--heads", type=positive_arg(int))
    ap.add_argument("--seq", type=positive_arg(int))
    ap.add_argument("--batch", type=positive_arg(int))
    ap.add_argument("--gpu-memory", type=_memory, required=True, help="e.g. 24GiB, 80GB, 1e3GB, or bytes")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="compute (autocast) dtype")
    ap.add_argument("--mlp-ratio", type=positive_arg(float), default=4.0)
    ap.add_argument("--param-dtype", default="fp32", choices=sorted(DTYPES), help="weights (--config)")
    ap.add_argument("--optimizer", type=_optimizer, default="adamw",
                    help="adamw, adamw_8bit, sgd, sgd_momentum or state bytes per parameter (--config)")  # fmt: skip
    ap.add_argument("--no-master-weights", action="store_true", help="no fp32 master copy of 16-bit params (--config)")
    ap.add_argument("--lora-rank", type=_rank, default=0, help="LoRA rank; 0 = full fine-tuning (--config)")
    ap.add_argument("--lora-targets", default="all-linear", help="comma-separated module names or all-linear")
    ap.add_argument("--drop-logits", action="store_true", help="the loop does not hold outputs.logits (--config)")
    ap.add_argument("--fused-chunk", type=_memory, default=256 * 2**20, help="fused head chunk budget (--config)")
    return ap


def _config_table(ap, a) -> str:
    from .planner_fit import plan_model

    if a.seq is None and a.batch is None:
        ap.error("argument --seq: give --seq (max batch) or --batch (max seq) with --config")
    targets = a.lora_targets if a.lora_targets == "all-linear" else tuple(t for t in a.lora_targets.split(",") if t)
    setup = dict(param_dtype=a.param_dtype, compute_dtype=a.dtype, optimizer=a.optimizer,
                 master_weights=False if a.no_master_weights else None, lora_rank=a.lora_rank, lora_targets=targets,
                 keep_logits=not a.drop_logits, fused_chunk_bytes=a.fused_chunk)  # fmt: skip
    try:
        return str(plan_model(a.config, seq_len=a.seq, batch=a.batch, memory_budget=a.gpu_memory, **setup))
    except (ValueError, TypeError, FileNotFoundError) as e:
        ap.error(f"argument --config: {e}")


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(_attach_values(list(sys.argv[1:] if argv is None else argv)))
    if a.config is not None:
        print(_config_table(ap, a))
        return 0
    for flag in ("d_model", "layers", "heads", "seq", "batch"):
        if getattr(a, flag) is None:
            ap.error(f"the following arguments are required: --{flag.replace('_', '-')} (or give --config)")
    if a.d_model % a.heads:
        ap.error(f"argument --heads: {a.heads} heads do not divide --d-model {a.d_model}")
    if int(a.mlp_ratio * a.d_model) < 1:
        ap.error(f"argument --mlp-ratio: {a.mlp_ratio:g} x --d-model {a.d_model} gives an MLP width of 0")
    try:
        print(table(a.d_model, a.layers, a.heads, a.seq, a.batch, a.gpu_memory, a.dtype, a.mlp_ratio))
    except ValueError as e:  # every argument is checked above; this names the planner argument that failed
        ap.error(str(e))
    return 0


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return plan(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
