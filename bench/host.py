"""``python -m bench.host``: host (CPU-side, Python + dispatch) cost of one block training step, in µs.

At tiny shapes (default d=64, 4 heads, T=8, B=1, one thread) compute is ~0, so a step's wall time is what the host
spends issuing it: Python, torch dispatch, custom-op wrappers, kernel launch glue. A GPU step is only as fast as the
host can issue it, so this is the floor ckpt_ext adds per block before CUDA graphs or torch.compile.

Rows: eager TransformerBlock, torch.utils.checkpoint over it, and every ckpt_ext policy on each CPU backend (cpp,
reference), for the GPT-2 form and the Llama form (RoPE tables, GQA). Columns: µs per step (forward + backward, median
of interleaved repeats: every variant runs once per round, so drift hits them alike) with the spread (interquartile
range), ops dispatched per step (aten + ckpt_ext, counted by a TorchDispatchMode), and the ratio to the eager block
("noisy" when the spread of either side exceeds the difference). Then µs per dispatch of a ckpt_ext custom op vs an
aten op of the same tiny size, which prices each op the block issues.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import ckpt_ext
from ckpt_ext import FusedCheckpointBlock, TransformerBlock
from ckpt_ext.block import init_block_

POLICIES = ("none", "pointwise", "ffn", "block_keep_attn", "block")
BACKENDS = ("cpp", "reference")


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.namespace] += 1
        return func(*args, **(kwargs or {}))


def make_block(family: str, d: int, heads: int) -> TransformerBlock:
    torch.manual_seed(0)
    if family == "llama":
        blk = TransformerBlock(d, heads, activation="swiglu", n_kv_heads=max(1, heads // 2), d_ff=3 * d)
    else:
        blk = TransformerBlock(d, heads)
    init_block_(blk)
    return blk


def rope_tables(t: int, dh: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE (cos, sin), each (1, T, dh), base 10000."""
    inv = 10000.0 ** (-torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv  # (T, dh/2)
    ang = torch.cat([ang, ang], dim=-1)[None]
    return ang.cos(), ang.sin()


def variants(block: TransformerBlock, kwargs: dict) -> dict:
    """name -> (backend or None, step(x, g))."""

    def step_of(fn):
        return lambda x, g: fn(x, **kwargs).backward(g)

    out = {
        "TransformerBlock": (None, step_of(block)),
        "torch checkpoint": (None, step_of(lambda x, **kw: checkpoint(block, x, use_reentrant=False, **kw))),
    }
    for backend in BACKENDS:
        for policy in POLICIES:
            out[f"{backend} {policy}"] = (backend, step_of(FusedCheckpointBlock.from_block(block, policy)))
    return out


def _run(entry, x, g):
    backend, step = entry
    if backend is None:
        step(x, g)
    else:
        with ckpt_ext.set_backend(backend):
            step(x, g)


def time_interleaved(table: dict, x, g, rounds: int, inner: int) -> dict:
    """name -> list of µs per step (one sample = the mean over ``inner`` back-to-back steps)."""
    samples = {name: [] for name in table}
    for entry in table.values():
        for _ in range(3):
            _run(entry, x, g)
    for _ in range(rounds):
        for name, entry in table.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                _run(entry, x, g)
            samples[name].append((time.perf_counter() - t0) / inner * 1e6)
    return samples


def summary(ts: list[float]) -> tuple[float, float]:
    """(median, interquartile spread)."""
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return statistics.median(ts), q[2] - q[0]


def ratio(a: tuple[float, float], b: tuple[float, float]) -> str:
    """a/b as text, or "noisy" when the spreads exceed the difference of the medians."""
    if abs(a[0] - b[0]) < max(a[1], b[1]):
        return "noisy"
    return f"{a[0] / b[0]:.2f}"


def count_ops(entry, x, g) -> Counter:
    counter = _OpCounter()
    with counter:
        _run(entry, x, g)
    return counter.ops


def dispatch_cost(rounds: int, inner: int) -> dict:
    """µs per call: a ckpt_ext custom op (Python custom_op wrapper + backend lookup + kernel) vs aten ops."""
    x = torch.randn(8, 64)
    w, b = torch.ones(64), torch.zeros(64)
    calls = {
        "aten add": lambda: torch.add(x, x),
        "aten layer_norm": lambda: torch.nn.functional.layer_norm(x, (64,), w, b),
        "ckpt_ext layer_norm_fwd (cpp)": ("cpp", lambda: torch.ops.ckpt_ext.layer_norm_fwd(x, w, b, 1e-5)),
        "ckpt_ext layer_norm_fwd (reference)": ("reference", lambda: torch.ops.ckpt_ext.layer_norm_fwd(x, w, b, 1e-5)),
        "ckpt_ext dropout_add p=0 (cpp)": ("cpp", lambda: torch.ops.ckpt_ext.dropout_add(x, x, 0.0, 0)),
    }
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            backend, fn = call if isinstance(call, tuple) else ("reference", call)
            with ckpt_ext.set_backend(backend):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - t0) / inner * 1e6)
    return {name: summary(ts) for name, ts in samples.items()}


def run(family="gpt2", d=64, heads=4, seq=8, batch=1, rounds=15, inner=20, threads=1) -> list[dict]:
    torch.set_num_threads(threads)
    block = make_block(family, d, heads)
    kwargs = {"position_embeddings": rope_tables(seq, d // heads)} if family == "llama" else {}
    x = torch.randn(batch, seq, d, requires_grad=True)
    g = torch.randn_like(x)
    table = variants(block, kwargs)
    samples = time_interleaved(table, x, g, rounds, inner)
    stats = {name: summary(ts) for name, ts in samples.items()}
    rows = []
    for name, entry in table.items():
        ops = count_ops(entry, x, g)
        rows.append(
            dict(
                variant=name,
                us=stats[name][0],
                spread=stats[name][1],
                aten_ops=ops["aten"] + ops["prims"],
                ckpt_ops=ops["ckpt_ext"],
                vs_eager=ratio(stats[name], stats["TransformerBlock"]),
                vs_ckpt=ratio(stats[name], stats["torch checkpoint"]),
            )
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| variant | µs / step | spread | aten ops | ckpt_ext ops | × eager | × torch ckpt |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['us']:.0f} | {r['spread']:.0f} | {r['aten_ops']} | {r['ckpt_ops']} | "
            f"{r['vs_eager']} | {r['vs_ckpt']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("gpt2", "llama", "both"), default="both")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (samples per variant)")
    ap.add_argument("--inner", type=int, default=20, help="back-to-back steps per sample")
    args = ap.parse_args(argv)
    families = ("gpt2", "llama") if args.family == "both" else (args.family,)
    for family in families:
        rows = run(family, args.d_model, args.heads, args.seq, args.batch, args.rounds, args.inner)
        print(f"\n{family} block d={args.d_model} heads={args.heads} T={args.seq} B={args.batch}, 1 thread, fp32: "
              "host µs per training step (fwd + bwd)")  # fmt: skip
        print(format_table(rows))
    print("\nµs per op dispatch (8 x 64 fp32, 1 thread): median, spread")
    for name, (med, spread) in dispatch_cost(args.rounds, args.inner * 10).items():
        print(f"| {name} | {med:.1f} | {spread:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
