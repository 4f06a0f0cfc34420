"""``python -m bench.block``: one block, every policy, side by side in one run.

Columns per variant: retained activation bytes (× the block input's bytes, measured), what the policy table predicts,
FLOPs of one training step (× the `none` policy, FlopCounterMode), and CPU step time (forward + backward, median of
interleaved repeats) as a ratio to TransformerBlock eager and to torch.utils.checkpoint(use_reentrant=False).
Timing is CPU wall clock on whatever backend `auto` picks (the C++ kernels when built); FLOPs and bytes are
device-independent and describe the graph a GPU runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.checkpoint import checkpoint

import ckpt_ext
from ckpt_ext import FusedCheckpointBlock, TransformerBlock, retained_bytes
from ckpt_ext.block import init_block_
from ckpt_ext.measure import count_flops, retained_activation_bytes

from . import malloc_tuning

POLICIES = ("none", "pointwise", "ffn", "block")


def _variants(block: TransformerBlock) -> dict:
    variants = {
        "TransformerBlock": block,
        "torch checkpoint": lambda x: checkpoint(block, x, use_reentrant=False),
        "torch checkpoint (reentrant)": lambda x: checkpoint(block, x, use_reentrant=True),
    }
    for policy in POLICIES:
        variants[f"fused {policy}"] = FusedCheckpointBlock.from_block(block, policy)
    return variants


def _step(fn, x, g):
    fn(x).backward(g)


def _time_interleaved(variants: dict, x, g, repeats: int) -> dict:
    """Median seconds per step; variants run round-robin so drift hits them all alike."""
    times = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        _step(fn, x, g)
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            _step(fn, x, g)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(d_model=256, n_heads=8, seq=256, batch=8, repeats=7, threads=None) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    block = TransformerBlock(d_model, n_heads)
    init_block_(block)
    x = torch.randn(batch, seq, d_model, requires_grad=True)
    g = torch.randn_like(x)
    in_bytes = x.numel() * x.element_size()
    variants = _variants(block)
    times = _time_interleaved(variants, x, g, repeats)
    flops_none = count_flops(_step, variants["fused none"], x, g)
    rows = []
    for name, fn in variants.items():
        kept, _ = retained_activation_bytes(fn, x)
        policy = name.split()[-1] if name.startswith("fused") else None
        predicted = retained_bytes(policy, batch, seq, d_model, n_heads, block.hidden) if policy else None
        rows.append(
            dict(
                variant=name,
                retained=kept / in_bytes,
                table=None if predicted is None else predicted / in_bytes,
                flops=count_flops(_step, fn, x, g) / flops_none,
                vs_eager=times[name] / times["TransformerBlock"],
                vs_ckpt=times[name] / times["torch checkpoint"],
                ms=times[name] * 1e3,
            )
        )
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| variant | retained (× input) | table | FLOPs (× none) | step ms | × TransformerBlock | × torch ckpt |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        table = "" if r["table"] is None else f"{r['table']:.3f}"
        lines.append(
            f"| {r['variant']} | {r['retained']:.3f} | {table} | {r['flops']:.3f} | {r['ms']:.1f} | "
            f"{r['vs_eager']:.3f} | {r['vs_ckpt']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per variant (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)
    malloc = malloc_tuning.describe(malloc_tuning.keep_freed_memory())
    rows = run(args.d_model, args.heads, args.seq, args.batch, args.repeats, args.threads)
    print(f"block d={args.d_model} heads={args.heads} T={args.seq} B={args.batch} fp32, backend "
          f"{ckpt_ext.backend.concrete_backend('cpu')}, {torch.get_num_threads()} threads, {malloc}")  # fmt: skip
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
