"""``python -m bench.roofline``: the modeled step-time overhead and retained memory of every variant, as one table.

For each shape (default: d=768 T=1024 B=8 h=12 and d=2048 T=2048 B=4 h=16, bf16) the step of one block is traced
under FakeTensorMode and priced by ckpt_ext.roofline (max(FLOPs/788 TF/s, bytes/4.3 TB/s) + 3 µs per op). Columns:
retained activation memory in multiples of the block input's bytes, modeled ms, and the overhead against eager
TransformerBlock, torch.utils.checkpoint (non-reentrant) and reentrant checkpoint. Then each policy's target check.
"""

from __future__ import annotations

import argparse

import torch

from ckpt_ext import roofline

SHAPES = ((768, 1024, 8, 12), (2048, 2048, 4, 16))
TARGETS = {"pointwise": 0.01, "ffn": 0.08, "block": 0.15}
LABELS = {
    "eager": "eager TransformerBlock",
    "checkpoint": "torch checkpoint (non-reentrant)",
    "checkpoint_reentrant": "torch checkpoint (reentrant)",
    "selective": "torch selective (save matmuls+attn)",
    "none": "ckpt_ext none",
    "pointwise": "ckpt_ext pointwise",
    "ffn": "ckpt_ext ffn",
    "block": "ckpt_ext block",
}


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def rows(shapes=SHAPES, dtype=torch.bfloat16, activation="gelu") -> list[dict]:
    out = []
    for variant in roofline.VARIANTS:
        row = {"variant": variant}
        for i, (d, t, b, h) in enumerate(shapes):
            args = (d, t, b, h)
            trace = roofline.step_trace(variant, *args, dtype=dtype, activation=activation)
            step = trace.seconds
            base = {k: roofline.step_time(k, *args, dtype=dtype, activation=activation)
                    for k in ("eager", "checkpoint", "checkpoint_reentrant")}  # fmt: skip
            retained = roofline.retained_memory(variant, *args, dtype=dtype, activation=activation)
            row[i] = dict(ms=step * 1e3, retained=retained / trace.input_bytes,
                          **{f"vs_{k}": step / v - 1.0 for k, v in base.items()})  # fmt: skip
        out.append(row)
    return out


def markdown(table: list[dict], shapes=SHAPES) -> str:
    head = "| variant | memory (× input) |"
    rule = "|---|---|"
    for d, t, b, _ in shapes:
        head += f" d={d} T={t} B={b}: ms | vs eager | vs ckpt | vs reentrant |"
        rule += "---|---|---|---|"
    lines = [head, rule]
    for row in table:
        line = f"| {LABELS[row['variant']]} | {row[0]['retained']:.2f} |"
        for i in range(len(shapes)):
            r = row[i]
            line += f" {r['ms']:.3f} | {_pct(r['vs_eager'])} | {_pct(r['vs_checkpoint'])} | "
            line += f"{_pct(r['vs_checkpoint_reentrant'])} |"
        lines.append(line)
    return "\n".join(lines)


def target_report(table: list[dict], shapes=SHAPES) -> str:
    lines = []
    for row in table:
        target = TARGETS.get(row["variant"])
        if target is None:
            continue
        worst = max(row[i]["vs_eager"] for i in range(len(shapes)))
        verdict = "met" if worst <= target else "MISSED"
        lines.append(f"{row['variant']}: worst modeled overhead vs eager {_pct(worst)} (target ≤ {target:.0%}): "
                     f"{verdict}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--activation", default="gelu", choices=("gelu", "gelu_tanh"))
    args = parser.parse_args(argv)
    table = rows(dtype=getattr(torch, args.dtype), activation=args.activation)
    print(f"Roofline model: one block fwd+bwd, {args.dtype}, each op max(FLOPs/{roofline.PEAK_FLOPS / 1e12:.0f} TF/s, "
          f"bytes/{roofline.PEAK_BYTES_PER_S / 1e12:.1f} TB/s) + {roofline.LAUNCH_S * 1e6:.0f} µs")  # fmt: skip
    print(markdown(table))
    print()
    print(target_report(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
