"""The demo's outputs: the "Checkpointing Strategy Comparison" table (terminal and results/strategies.md) and the
memory-vs-overhead plot (results/strategies.png) with its Pareto front."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class Row:
    """One strategy's measured numbers (ratios are relative to the no-checkpointing baseline)."""

    name: str
    label: str
    act_bytes: int
    saved_pct: float
    recompute_x: float  # extra FLOPs of a training step, in forwards of the whole model
    step_s: float
    step_x: float
    tokens_per_s: float
    final_loss: float
    loss_rel_diff: float
    modeled_x: Optional[float] = None  # H200 roofline step time / no checkpointing
    peak_bytes: Optional[int] = None  # CUDA only
    max_batch: Optional[int] = None  # CUDA only


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _x(v: Optional[float], digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}×"


def table(rows: list[Row], cuda: bool = False, budget: Optional[int] = None) -> str:
    """Markdown table: one row per strategy, measured columns."""
    head = ["Strategy", "Activations kept", "Memory saved", "Recompute (× fwd)", "Step time", "× none", "tokens/s",
            "Final loss", "Δ loss (rel)"]  # fmt: skip
    has_model = any(r.modeled_x is not None for r in rows)
    if has_model:
        head.append("H200 model (× none)")
    if cuda:
        head += ["Peak memory", f"Max batch ≤ {fmt_bytes(budget)}", "× none batch"]
    base_batch = next((r.max_batch for r in rows if r.name == "none"), None)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [
            r.label,
            fmt_bytes(r.act_bytes),
            "baseline" if r.name == "none" else f"{r.saved_pct:.1f}%",
            f"{r.recompute_x:.2f}",
            f"{r.step_s * 1e3:.0f} ms",
            _x(r.step_x),
            f"{r.tokens_per_s:,.0f}",
            f"{r.final_loss:.4f}",
            f"{r.loss_rel_diff:.1e}",
        ]
        if has_model:
            cells.append(_x(r.modeled_x))
        if cuda:
            ratio = r.max_batch / base_batch if base_batch and r.max_batch is not None else None
            cells += [fmt_bytes(r.peak_bytes), "-" if r.max_batch is None else str(r.max_batch), _x(ratio, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, title: str, table_md: str, config: dict, notes: list[str]) -> None:
    cfg = "\n".join(f"| {k} | {v} |" for k, v in config.items())
    body = [f"# {title}", "", table_md, "", *[f"- {n}" for n in notes], "", "## Configuration", "",
            "| setting | value |", "|---|---|", cfg, ""]  # fmt: skip
    path.write_text("\n".join(body), encoding="utf-8")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower is better), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_y = [], math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def _label_offsets(xs: list[float], ys: list[float]) -> list[int]:
    """Vertical label offsets (points) that step labels of nearby points apart so they do not overlap."""
    span_x = (max(xs) - min(xs)) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0
    offsets: list[int] = []
    for i in range(len(xs)):
        near = sum(1 for j in range(i) if abs(xs[i] - xs[j]) < 0.25 * span_x and abs(ys[i] - ys[j]) < 0.05 * span_y)
        offsets.append(4 - 12 * near)
    return offsets


TITLE_CHARS = 78  # characters per title line: 10-pt text fits the 7.5-inch figure with margin


def plot(path: Path, rows: list[Row], title: str) -> None:
    """Activation memory kept vs step-time overhead, one labeled point per strategy, Pareto front as a step line."""
    import matplotlib.pyplot as plt

    fig = figure(rows, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(rows: list[Row], title: str):
    """The plot's matplotlib Figure (Agg); the title is wrapped at word boundaries so it fits the figure's width."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [(r.step_x - 1.0) * 100.0 for r in rows]  # step-time overhead, %
    ys = [r.act_bytes / 2**20 for r in rows]  # MiB kept
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    ax.scatter(xs, ys, s=40, color="tab:blue", zorder=3)
    for (x, y), r, dy in zip(zip(xs, ys), rows, _label_offsets(xs, ys)):
        ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(5, dy), fontsize=8)
    front = pareto_front(list(zip(xs, ys)))
    ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="tab:red", lw=1.2,
            label="Pareto front (less memory and less time)", zorder=2)  # fmt: skip
    ax.margins(x=0.2, y=0.08)
    ax.set_xlabel("step-time overhead vs no checkpointing (%)")
    ax.set_ylabel("activation memory kept (MiB)")
    ax.set_title(textwrap.fill(title, TITLE_CHARS), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
