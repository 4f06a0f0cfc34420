"""``python -m bench.host``: host (CPU-side, Python + dispatch) cost of one block training step, in µs.

At tiny shapes (default d=64, 4 heads, T=8, B=1, one thread) compute is ~0, so a step's wall time is what the host
spends issuing it: Python, torch dispatch, custom-op wrappers, kernel launch glue. A GPU step is only as fast as the
host can issue it, so this is the floor ckpt_ext adds per block before CUDA graphs or torch.compile.

Rows: eager TransformerBlock, torch.utils.checkpoint over it, and every ckpt_ext policy on each CPU backend, for the
GPT-2 form and the Llama form (RoPE tables, GQA): ``cpp`` as a user gets it (the block's forward and backward run as
traced C++ programs, ckpt_ext/traced.py), ``cpp walked`` with those programs off (the Python fast path walking
functional.py: what runs where a configuration is not eligible, e.g. dropout, masks, autocast), and ``reference``.
Columns: µs per step (forward + backward, median [25%-75%] of round-robin samples, bench.micro_timing: drift hits every
variant alike), ops dispatched per step (aten + ckpt_ext graph ops, counted by a TorchDispatchMode: the op graph, the
same with or without programs; ops inside a ckpt_ext op are not counted), and the paired ratio to the eager block and
to torch.utils.checkpoint ("noisy" when its spread exceeds its distance from 1). Then µs per call of a ckpt_ext graph
op, of the same C++ kernel called directly (the difference is torch's Python custom_op wrapper, which the block's fast
path skips), and of aten ops of the same tiny size. Last, the Triton path's host cost with every kernel launch stubbed
(bench/host_triton.py, its own process: it needs TRITON_INTERPRET=1 before triton is imported).
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import ckpt_ext
from ckpt_ext import FusedCheckpointBlock, TransformerBlock, traced
from ckpt_ext.backends.cpp import bridge as cpp_bridge
from ckpt_ext.block import init_block_

from .micro_timing import Timing, ratio_text, spread_text, summarize, time_interleaved

POLICIES = ("none", "pointwise", "ffn", "block_keep_attn", "block")
BACKENDS = (  # ((backend, traced programs on), row label)
    (("cpp", True), "cpp"),
    (("cpp", False), "cpp walked"),
    (("reference", True), "reference"),
)


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
    for backend, label in BACKENDS:
        for policy in POLICIES:
            out[f"{label} {policy}"] = (backend, step_of(FusedCheckpointBlock.from_block(block, policy)))
    return out


def _run(entry, x, g):
    backend, step = entry
    if backend is None:
        step(x, g)
        return
    name, traced_on = backend
    previous = traced.is_enabled()
    traced.set_enabled(traced_on)
    try:
        with ckpt_ext.set_backend(name):
            step(x, g)
    finally:
        traced.set_enabled(previous)


def count_ops(entry, x, g) -> Counter:
    counter = _OpCounter()
    with counter:
        _run(entry, x, g)
    return counter.ops


def dispatch_cost(min_time: float) -> dict:
    """Timing per call: a ckpt_ext graph op (torch's Python custom_op wrapper + backend lookup + kernel), the same
    C++ kernel called directly (no Python hop: the wrapper's cost is the difference), and aten ops."""
    x = torch.randn(8, 64)
    w, b = torch.ones(64), torch.zeros(64)

    def with_backend(name, fn):
        def run():
            with ckpt_ext.set_backend(name):
                return fn()

        return run

    calls = {
        "aten add": lambda: torch.add(x, x),
        "aten layer_norm": lambda: torch.nn.functional.layer_norm(x, (64,), w, b),
        "C++ layer_norm kernel, called directly": lambda: cpp_bridge.IMPLS["layer_norm_fwd"](x, w, b, 1e-5),
        "ckpt_ext::layer_norm_fwd (cpp)": with_backend("cpp", lambda: torch.ops.ckpt_ext.layer_norm_fwd(x, w, b, 1e-5)),
        "ckpt_ext::layer_norm_fwd (reference)": with_backend(
            "reference", lambda: torch.ops.ckpt_ext.layer_norm_fwd(x, w, b, 1e-5)
        ),
        "ckpt_ext::dropout_add p=0 (cpp)": with_backend("cpp", lambda: torch.ops.ckpt_ext.dropout_add(x, x, 0.0, 0)),
    }
    chain = _add_chain(x, PROGRAM_OPS)
    calls[f"aten add in a traced C++ program, per op (÷{PROGRAM_OPS})"] = lambda: chain(x)
    timings = time_interleaved(calls, min_time=min_time, min_rounds=7, sample_s=2e-3)
    key = f"aten add in a traced C++ program, per op (÷{PROGRAM_OPS})"
    t, n = timings[key], PROGRAM_OPS
    timings[key] = summarize([v / n for v in t.samples]) if t.samples else Timing(t.median / n, t.q20 / n, t.q80 / n)
    return timings


PROGRAM_OPS = 32


def _add_chain(x: torch.Tensor, n: int):
    """n chained aten adds traced into an op_program.OpProgram (what traced.py runs): its per-op cost is the boxed
    dispatcher call that replaces a Python-issued op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from ckpt_ext import op_program

    def chain(t):
        for _ in range(n):
            t = torch.add(t, x)
        return (t,)

    program = op_program.OpProgram(make_fx(chain)(x))
    return lambda t: program(t)


def run(family="gpt2", d=64, heads=4, seq=8, batch=1, min_time=3.0, threads=1) -> list[dict]:
    torch.set_num_threads(threads)
    block = make_block(family, d, heads)
    kwargs = {"position_embeddings": rope_tables(seq, d // heads)} if family == "llama" else {}
    x = torch.randn(batch, seq, d, requires_grad=True)
    g = torch.randn_like(x)
    table = variants(block, kwargs)
    times = time_interleaved({n: functools.partial(_run, e, x, g) for n, e in table.items()}, min_time, 7, 3, 5e-3)
    rows = []
    for name, entry in table.items():
        ops = count_ops(entry, x, g)
        rows.append(
            dict(
                variant=name,
                us=times[name].median * 1e6,
                step=spread_text(times[name], 1e6),
                aten_ops=ops["aten"] + ops["prims"],
                ckpt_ops=ops["ckpt_ext"],
                vs_eager=ratio_text(times[name], times["TransformerBlock"]),
                vs_ckpt=ratio_text(times[name], times["torch checkpoint"]),
            )
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| variant | µs / step [IQR] | aten ops | ckpt_ext ops | × eager | × torch ckpt |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['step']} | {r['aten_ops']} | {r['ckpt_ops']} | {r['vs_eager']} | {r['vs_ckpt']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("gpt2", "llama", "both"), default="both")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of interleaved timing per family")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton-path table (bench.host_triton)")
    args = ap.parse_args(argv)
    families = ("gpt2", "llama") if args.family == "both" else (args.family,)
    for family in families:
        rows = run(family, args.d_model, args.heads, args.seq, args.batch, args.min_time)
        print(f"\n{family} block d={args.d_model} heads={args.heads} T={args.seq} B={args.batch}, 1 thread, fp32: "
              "host µs per training step (fwd + bwd)")  # fmt: skip
        print(format_table(rows))
    print("\nµs per call (8 x 64 fp32, 1 thread), median [IQR]")
    for name, timing in dispatch_cost(args.min_time / 3).items():
        print(f"| {name} | {spread_text(timing, 1e6)} |")
    if not args.no_triton:
        cmd = [sys.executable, "-m", "bench.host_triton", "--family", args.family, "--min-time", str(args.min_time)]
        sys.stdout.flush()
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
