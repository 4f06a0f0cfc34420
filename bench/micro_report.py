"""Microbenchmark outputs: rows appended to a long-format CSV, one plot per op family, a terminal table."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

CSV_FIELDS = ("op", "provider", "mode", "shape", "metric", "value", "device", "versions", "timestamp")


@dataclass(frozen=True)
class Result:
    """One (op, mode, provider) measurement at one shape; times in seconds."""

    op: str
    family: str
    mode: str
    provider: str
    shape: str
    median_s: float
    q20_s: float
    q80_s: float
    nbytes: int
    flops: int
    roofline_s: float
    vs_eager: str = "-"  # eager time / this one (median per-round ratio) or "noisy"; not a CSV metric

    @property
    def gbps(self) -> float:
        return self.nbytes / self.median_s / 1e9

    @property
    def tflops(self) -> float:
        return self.flops / self.median_s / 1e12

    def metrics(self) -> dict[str, float]:
        out = {"time_median_ms": self.median_s * 1e3, "time_q20_ms": self.q20_s * 1e3, "time_q80_ms": self.q80_s * 1e3,
               "bytes": float(self.nbytes), "flops": float(self.flops), "gbps": self.gbps,
               "roofline_h200_ms": self.roofline_s * 1e3}  # fmt: skip
        if self.flops:
            out["tflops"] = self.tflops
        return out


def append_csv(path: Path, results: list[Result], device: str, versions: str, timestamp: str) -> int:
    """Append one row per metric; writes the header when the file is new. Returns the rows written."""
    new = not path.exists() or path.stat().st_size == 0
    rows = 0
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(CSV_FIELDS)
        for r in results:
            for metric, value in r.metrics().items():
                row = (r.op, r.provider, r.mode, r.shape, metric, f"{value:.6g}", device, versions, timestamp)
                writer.writerow(row)
                rows += 1
    return rows


def table(results: list[Result]) -> str:
    head = ("op", "mode", "provider", "median", "q20-q80", "eager/this", "GB/s", "TFLOP/s", "H200 roofline")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        tflops = f"{r.tflops:.3f}" if r.flops else "-"
        lines.append(
            f"| {r.op} | {r.mode} | {r.provider} | {r.median_s * 1e3:.3f} ms | {r.q20_s * 1e3:.3f}-{r.q80_s * 1e3:.3f}"
            f" | {r.vs_eager} | {r.gbps:.1f} | {tflops} | {r.roofline_s * 1e6:.1f} µs |"
        )
    return "\n".join(lines)


def plot_family(path: Path, family: str, results: list[Result], device: str) -> None:
    """Median time (q20-q80 whiskers) per op/mode and provider, log scale, with the H200 roofline as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r.op, r.mode) for r in results))
    providers = list(dict.fromkeys(r.provider for r in results))
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(1.8 + 1.9 * len(groups), 4.2))
    for j, prov in enumerate(providers):
        xs, ys, lo, hi = [], [], [], []
        for i, g in enumerate(groups):
            r = next((r for r in results if (r.op, r.mode) == g and r.provider == prov), None)
            if r is None:
                continue
            xs.append(i + (j - (len(providers) - 1) / 2) * width)
            ys.append(r.median_s * 1e3)
            lo.append(max(r.median_s - r.q20_s, 0.0) * 1e3)
            hi.append(max(r.q80_s - r.median_s, 0.0) * 1e3)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=prov)
    for i, g in enumerate(groups):
        roof = next(r.roofline_s for r in results if (r.op, r.mode) == g) * 1e3
        ax.hlines(roof, i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1,
                  label="H200 roofline model" if i == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(groups)), [f"{op}\n({mode})" for op, mode in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("time per call (ms)")
    shape = results[0].shape if results else ""
    ax.set_title(f"ckpt_ext::{family} vs torch — {shape}, {device}", fontsize=9)
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite(results: list[Result]) -> bool:
    return all(math.isfinite(v) for r in results for v in r.metrics().values())
