"""``python -m bench.host``: host (CPU-side, Python + dispatch) cost of one block training step, in µs.

At tiny shapes (default d=64, 4 heads, T=8, B=1, one thread) compute is ~0, so a step's wall time is what the host
spends issuing it: Python, torch dispatch, custom-op wrappers, kernel launch glue. A GPU step is only as fast as the
host can issue it, so this is the floor ckpt_ext adds per block before CUDA graphs or torch.compile (on a GPU, host
overhead is CUDA graphs' job: torch.compile(mode="reduce-overhead")).

Rows: eager TransformerBlock, torch.utils.checkpoint over it, every ckpt_ext policy on each CPU backend (``cpp``: the
eager fast path walking functional.py, the C++ kernels called directly; ``reference``: plain-PyTorch math), and
``torch.compile cpp block``: the same fused block (policy "block", cpp backend) under torch.compile in its default mode,
compiled (forward and backward) once before anything is timed, so the table shows the fast path and torch.compile side
by side. For the GPT-2 form and the Llama form (RoPE tables, GQA). Columns: µs per step (forward + backward, median
[25%-75%] of round-robin samples, bench.micro_timing: drift hits every variant alike), ops dispatched per step (aten +
ckpt_ext graph ops, counted by a TorchDispatchMode; ops inside a ckpt_ext op are not counted; none for the
torch.compile row: under a dispatch mode its module runs eagerly), and the paired ratio to the eager block and to
torch.utils.checkpoint ("noisy" when its spread exceeds its distance from 1). Then µs per call of a ckpt_ext graph op,
of the same C++ kernel called directly (the difference is torch's Python custom_op wrapper, which the block's fast
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
from ckpt_ext import FusedCheckpointBlock, TransformerBlock
from ckpt_ext.backends.cpp import bridge as cpp_bridge
from ckpt_ext.block import init_block_

from .micro_timing import markdown_table, ratio_text, spread_text, time_interleaved

POLICIES = ("none", "pointwise", "ffn", "block_keep_attn", "block")
BACKENDS = ("cpp", "reference")  # a row label is the backend's name
COMPILED_POLICY = "block"  # the fused block run under torch.compile (cpp backend)
COMPILED = f"torch.compile cpp {COMPILED_POLICY}"


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


def variants(block: TransformerBlock, kwargs: dict, x: torch.Tensor, g: torch.Tensor) -> dict:
    """name -> (backend or None, step(x, g)); the torch.compile variant is compiled here, on (x, g), forward and
    backward, so that no timed call compiles."""

    def step_of(fn):
        return lambda x, g: fn(x, **kwargs).backward(g)

    out = {
        "TransformerBlock": (None, step_of(block)),
        "torch checkpoint": (None, step_of(lambda x, **kw: checkpoint(block, x, use_reentrant=False, **kw))),
    }
    for backend in BACKENDS:
        for policy in POLICIES:
            out[f"{backend} {policy}"] = (backend, step_of(FusedCheckpointBlock.from_block(block, policy)))
    torch._dynamo.reset()
    out[COMPILED] = ("cpp", step_of(torch.compile(FusedCheckpointBlock.from_block(block, COMPILED_POLICY))))
    _run(out[COMPILED], x, g)
    return out


def _run(entry, x, g):
    backend, step = entry
    if backend is None:
        step(x, g)
        return
    with ckpt_ext.set_backend(backend):
        step(x, g)


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
    return time_interleaved(calls, min_time=min_time, min_rounds=7, sample_s=2e-3)


def run(family="gpt2", d=64, heads=4, seq=8, batch=1, min_time=3.0, threads=1) -> list[dict]:
    torch.set_num_threads(threads)
    block = make_block(family, d, heads)
    kwargs = {"position_embeddings": rope_tables(seq, d // heads)} if family == "llama" else {}
    x = torch.randn(batch, seq, d, requires_grad=True)
    g = torch.randn_like(x)
    table = variants(block, kwargs, x, g)
    times = time_interleaved({n: functools.partial(_run, e, x, g) for n, e in table.items()}, min_time, 7, 3, 5e-3)
    rows = []
    for name, entry in table.items():
        ops = count_ops(entry, x, g) if name != COMPILED else dict.fromkeys(("aten", "prims", "ckpt_ext"), None)
        rows.append(
            dict(
                variant=name,
                us=times[name].median * 1e6,
                step=spread_text(times[name], 1e6),
                aten_ops=None if ops["aten"] is None else ops["aten"] + ops["prims"],
                ckpt_ops=ops["ckpt_ext"],
                vs_eager=ratio_text(times[name], times["TransformerBlock"]),
                vs_ckpt=ratio_text(times[name], times["torch checkpoint"]),
            )
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = ("variant", "µs / step [IQR]", "aten ops", "ckpt_ext ops", "× eager", "× torch ckpt")
    cells = [
        (r["variant"], r["step"], *("—" if n is None else n for n in (r["aten_ops"], r["ckpt_ops"])), r["vs_eager"],
         r["vs_ckpt"])
        for r in rows
    ]  # fmt: skip
    return markdown_table(header, cells)


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
