"""Timers and the H200 roofline price for the microbenchmarks.

GPU: ``triton.testing.do_bench`` (L2 flushed between calls, CUDA events) with quantiles 0.5 / 0.2 / 0.8.
CPU: a perf_counter loop, one sample per call after warm-up, until ``min_time`` seconds and ``min_reps`` samples.
Roofline: max(FLOPs / 788 TFLOP/s, bytes / 4.3 TB/s) + 3 µs on an H200, priced by ckpt_ext.roofline.price (the
project's cost model) when it is importable, else by the same formula here.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

H200_FLOPS = 788e12  # bf16 dense matmul, FLOP/s
H200_BYTES = 4.3e12  # device memory copy, B/s
LAUNCH_S = 3e-6  # per-kernel floor


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the 20% / 80% quantiles."""

    median: float
    q20: float
    q80: float


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
