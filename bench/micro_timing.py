"""Timers and the H200 roofline price for the microbenchmarks (and bench.cpu).

GPU: ``triton.testing.do_bench`` (L2 flushed between calls, CUDA events) with quantiles 0.5 / 0.2 / 0.8.
CPU: a perf_counter loop, one sample per call after warm-up, until ``min_time`` seconds and ``min_reps`` samples.
CPU, several variants (``time_interleaved``): round-robin, one sample of every variant per round (the order rotates
each round), so a load change on a shared machine hits every variant alike; a sample is ``number`` calls, chosen so
a sample lasts >= ``sample_s``. Comparisons use the per-round ratios of two variants (paired samples): median and
interquartile range. ``ratio_text`` prints the median ratio only when the IQR is smaller than its distance from 1
(the difference it reports), else "noisy". ``markdown_table`` prints the benchmarks' result tables.
Roofline: max(FLOPs / 788 TFLOP/s, bytes / 4.3 TB/s) + 3 µs on an H200, priced by ckpt_ext.roofline.price (the
project's cost model) when it is importable, else by the same formula here.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

H200_FLOPS = 788e12  # bf16 dense matmul, FLOP/s
H200_BYTES = 4.3e12  # device memory copy, B/s
LAUNCH_S = 3e-6  # per-kernel floor


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the 20% / 80% quantiles (``samples``: per-round seconds when interleaved)."""

    median: float
    q20: float
    q80: float
    samples: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @property
    def iqr(self) -> tuple[float, float]:
        """(25%, 75%) quantiles of the samples; (q20, q80) when there are none."""
        if not self.samples:
            return self.q20, self.q80
        s = sorted(self.samples)
        return _quantile(s, 0.25), _quantile(s, 0.75)


def summarize(samples: Sequence[float]) -> Timing:
    """Timing of raw per-call samples (kept in their original order)."""
    s = sorted(samples)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), tuple(samples))


def roofline_seconds(flops: int, nbytes: int) -> float:
    try:
        from ckpt_ext.roofline import price
    except ImportError:
        return max(flops / H200_FLOPS, nbytes / H200_BYTES) + LAUNCH_S
    return price(flops, nbytes)


def _quantile(sorted_samples: list[float], q: float) -> float:
    pos = q * (len(sorted_samples) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (pos - lo)


def time_cpu(fn: Callable[[], object], min_time: float = 0.2, min_reps: int = 5, warmup: int = 2) -> Timing:
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8))


def time_cuda(fn: Callable[[], object], min_time: float = 0.2) -> Timing:
    from triton.testing import do_bench

    ms = do_bench(fn, rep=max(1, int(min_time * 1e3)), quantiles=[0.5, 0.2, 0.8])
    return Timing(*(m * 1e-3 for m in ms))


def time_fn(fn: Callable[[], object], device: torch.device, min_time: float) -> Timing:
    if device.type == "cuda":
        return time_cuda(fn, min_time)
    return time_cpu(fn, min_time)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    min_time: float = 0.2,
    min_rounds: int = 5,
    warmup: int = 1,
    sample_s: float = 1e-3,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Seconds per call of every variant, measured round-robin in one loop (see the module docstring)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    number = {}
    for name in names:  # calls per sample: one call timed after warm-up
        t0 = clock()
        fns[name]()
        number[name] = max(1, math.ceil(sample_s / max(clock() - t0, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    start, rounds = clock(), 0
    while rounds < min_rounds or clock() - start < min_time:
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = clock()
            for _ in range(number[name]):
                fns[name]()
            samples[name].append((clock() - t0) / number[name])
        rounds += 1
    return {name: summarize(samples[name]) for name in names}


def ratio(num: Timing, den: Timing) -> tuple[float, float, float]:
    """Median and IQR (25%, 75%) of num/den over paired rounds; without samples, the medians' ratio and the
    extreme ratios of the two (q20, q80) ranges."""
    if num.samples and len(num.samples) == len(den.samples):
        r = sorted(a / b for a, b in zip(num.samples, den.samples))
        return statistics.median(r), _quantile(r, 0.25), _quantile(r, 0.75)
    return num.median / den.median, num.q20 / den.q80, num.q80 / den.q20


def ratio_text(num: Timing, den: Timing) -> str:
    """ "1.23x" (num/den) when the ratio's IQR is narrower than its distance from 1, else "noisy"."""
    mid, lo, hi = ratio(num, den)
    if hi - lo > abs(mid - 1.0):
        return "noisy"
    return f"{mid:.2f}x"


def spread_text(t: Timing, scale: float = 1e3) -> str:
    """ "median [q25-q75]" in ms (scale 1e3)."""
    lo, hi = t.iqr
    return f"{t.median * scale:.3f} [{lo * scale:.3f}-{hi * scale:.3f}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table: the header line, its separator line, one line per row (each cell printed with str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
