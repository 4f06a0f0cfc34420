"""Shared plumbing of the GPU check: where results go, how a callable is timed, how tables are written.

Timing: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, median in ms); on CPU (the
``--device cpu`` smoke mode that checks this script's plumbing without a GPU) a perf_counter median over a few calls.
Results: ``$OUT`` if set, else bench/results/; each tool writes ``<name>.csv`` (one row per measurement) and
``<name>.md`` (the same rows as a markdown table).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

PEAK_FLOPS = 788e12  # H200 bf16 dense matmul measured with torch, FLOP/s
PEAK_BYTES_PER_S = 4.3e12  # H200 device-to-device copy measured with torch, B/s


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def time_ms(fn: Callable[[], object], device: str, reps: int = 5) -> float:
    """Median milliseconds of one call of ``fn``."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def memory(fn, x, grad, device: str) -> tuple[int, int]:
    """(peak bytes over one step, bytes kept after forward), both above what was allocated before the step (CUDA;
    0, 0 elsewhere)."""
    if device != "cuda":
        return 0, 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(x)
    kept = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
    out.backward(grad)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, kept


def step_grads(fn, x, grad, params) -> list:
    """[output, dx, d(each param)] of one step of ``fn`` from a fresh leaf copy of ``x``."""
    x = x.detach().requires_grad_(True)
    for p in params:
        p.grad = None
    out = fn(x)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad for p in params]


def compare_variants(variants: dict, x, grad, params, ref: list, device: str, baselines: dict) -> list[dict]:
    """One row per variant (name -> x -> output, all sharing ``params``): max |Δ| of the output and every gradient
    against ``ref`` (step_grads of an fp32 copy), step ms, peak and kept MiB, and step_ms / step_ms of each baseline
    (column -> variant name)."""
    rows, times = [], {}
    for name, fn in variants.items():
        got = step_grads(fn, x, grad, params)
        err = max(float((a.float() - r).abs().max()) for a, r in zip(got, ref) if a is not None)
        xr = x.detach().requires_grad_(True)
        times[name] = time_ms(lambda fn=fn, xr=xr: fn(xr).backward(grad), device)
        peak, kept = memory(fn, xr, grad, device)
        rows.append(dict(variant=name, max_abs_err=err, step_ms=times[name], peak_mib=peak / 2**20,
                         kept_mib=kept / 2**20))  # fmt: skip
    for row in rows:
        for column, base in baselines.items():
            row[column] = row["step_ms"] / times[base]
    return rows


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu (plumbing smoke run, timings meaningless)"


def write_tables(name: str, rows: list[dict], title: str) -> Path:
    """rows -> <out>/<name>.csv and <out>/<name>.md; returns the markdown path."""
    out = out_dir()
    keys = list(rows[0]) if rows else []
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"## {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    md = out / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def cli_main(name: str, description: str, run: Callable[[str], list[dict]], title: str, argv=None) -> int:
    """The command line of a GPU check tool: ``--device`` (cuda when available; cpu only under TRITON_INTERPRET=1),
    ``run(device)`` rows written as <out>/<name>.csv and .md with ``title`` on the device."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(f"{name} --device cpu needs TRITON_INTERPRET=1")
    rows = run(args.device)
    md = write_tables(name, rows, f"{title} on {device_name(args.device)}")
    print(f"wrote {md}")
    return 0


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
