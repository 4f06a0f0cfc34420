"""What the demo measures per strategy: kept activation bytes, FLOPs, timed training steps, and (CUDA) peak memory and
the largest batch that fits a memory budget.

Every function takes models built by demo_model.make_strategy; batches are (B, T + 1) int64 windows of the corpus.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Optional

import torch
from torch import Tensor

from ckpt_ext.measure import count_flops, retained_activation_bytes

from .demo_model import TinyGPT


def make_batches(corpus: bytes, steps: int, batch: int, seq: int, seed: int, device: str) -> list[Tensor]:
    """``steps`` batches of random (B, T + 1) windows, the same for every strategy (drawn from ``seed``)."""
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()  # (n_bytes,)
    if data.numel() < seq + 2:
        raise ValueError(f"corpus has {data.numel()} bytes, too short for --seq {seq}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (steps, batch), generator=gen)  # (S, B)
    offsets = torch.arange(seq + 1)  # (T + 1,)
    return [data[s[:, None] + offsets].to(device) for s in starts]  # S x (B, T + 1)


def activation_bytes(model: TinyGPT, batch: Tensor) -> int:
    """Bytes the autograd graph of one forward (tokens -> loss) keeps for backward."""
    kept, loss = retained_activation_bytes(model.loss, batch)
    del loss
    return kept


def forward_flops(model: TinyGPT, batch: Tensor) -> int:
    with torch.no_grad():
        return count_flops(model.loss, batch)


def step_flops(model: TinyGPT, batch: Tensor) -> int:
    """FLOPs of forward + backward (recompute included); leaves no gradients behind."""
    flops = count_flops(lambda: model.loss(batch).backward())
    model.zero_grad(set_to_none=True)
    return flops


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class Trainer:
    """One strategy's model + AdamW; ``step`` trains on a batch and returns (loss, seconds)."""

    def __init__(self, model: TinyGPT, lr: float, device: str):
        self.model, self.device = model, device
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def step(self, batch: Tensor) -> tuple[float, float]:
        _sync(self.device)
        t0 = time.perf_counter()
        loss = self.model.loss(batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return float(loss.detach()), time.perf_counter() - t0


def train_round_robin(
    trainers: dict[str, Trainer],
    batches: list[Tensor],
    on_step: Optional[Callable[[], None]] = None,
    deadline: Optional[float] = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Train every strategy on the same batches, interleaved step by step so drift hits all alike.

    Returns (losses, seconds) per strategy, one entry per step. The strategy order rotates every step so no
    strategy always runs right after the same neighbour. With ``deadline`` (a time.perf_counter() value), stops
    after the first round past 2 whose successor would end after it: every strategy always runs the same steps.
    """
    names = list(trainers)
    losses: dict[str, list[float]] = {n: [] for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for i, batch in enumerate(batches):
        round_start = time.perf_counter()
        for name in names[i % len(names) :] + names[: i % len(names)]:
            loss, dt = trainers[name].step(batch)
            losses[name].append(loss)
            seconds[name].append(dt)
            if on_step is not None:
                on_step()
        now = time.perf_counter()
        if deadline is not None and i >= 2 and now + (now - round_start) > deadline:
            break
    return losses, seconds


def median_step(seconds: list[float], warmup: int = 1) -> float:
    """Median step time, skipping the first ``warmup`` steps (allocator and kernel warm-up) when there are more."""
    timed = seconds[warmup:] if len(seconds) > warmup else seconds
    return statistics.median(timed)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def cuda_step_peak(factory: Callable[[], TinyGPT], batch: int, seq: int, device: str) -> Optional[int]:
    """Peak bytes one training step allocates beyond what was resident before: weights, grads, AdamW state and
    activations of a fresh model from ``factory`` at ``batch`` (None when it runs out of memory)."""
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model = opt = None
    try:
        model = factory().to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, 256, (batch, seq + 1), device=device)  # (B, T + 1)
        model.loss(tokens).backward()
        opt.step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
        return None
    finally:
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(
    factory: Callable[[], TinyGPT], seq: int, budget: int, device: str, start: int = 8, cap: int = 1 << 16
) -> int:
    """Largest batch whose training step peaks within ``budget`` bytes (0 if even batch 1 does not): doubling from
    ``start`` until a probe fails, then bisection; each probe is one training step of a fresh model."""

    def fits(b: int) -> bool:
        peak = cuda_step_peak(factory, b, seq, device)
        return peak is not None and peak <= budget

    lo, hi = 0, None  # lo fits (0 trivially), hi does not
    b = max(1, start)
    while hi is None:
        if fits(b):
            lo = b
            if b >= cap:
                return b
            b = min(2 * b, cap)
        else:
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
