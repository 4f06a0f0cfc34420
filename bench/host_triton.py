"""``python -m bench.host_triton``: host cost of the Triton path per block step, with every kernel launch stubbed.

Run as its own process (bench.host starts it): TRITON_INTERPRET=1 is set here before triton or ckpt_ext.kernels is
imported, so the triton backend accepts CPU tensors, and ``InterpretedFunction.run`` (what ``kernel[grid](...)``
calls, autotuned kernels included) is replaced by a counter that returns at once. A step then runs everything the host
does on the GPU path except Triton's own launch: the custom-op dispatch, ckpt_ext's launchers (shape checks,
allocations, grids, config choice), the block's Python, autograd. Outputs are uninitialized memory: only time counts.
What it cannot see, without a GPU, is Triton's per-launch runtime (argument binding, kernel-cache lookup,
cuLaunchKernel); the launches per step are counted so that cost can be added:
    GPU host µs per step ≈ stubbed µs + launches × Triton's launch µs.

Rows: the eager TransformerBlock (aten, for reference: on a GPU its kernels launch from C++) and every ckpt_ext policy
on the triton backend, GPT-2 and Llama forms, tiny shapes (d=64, 4 heads, T=8, B=1), one thread, µs per step
(median [IQR], round-robin samples) and launches per step.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import functools  # noqa: E402

import torch  # noqa: E402

LAUNCHES = [0]


def stub_launches() -> None:
    """Every Triton kernel launch counts one and returns without running the kernel."""
    from triton.runtime.interpreter import InterpretedFunction

    def run(self, *args, **kwargs):
        LAUNCHES[0] += 1

    InterpretedFunction.run = run


def run(family: str = "gpt2", d: int = 64, heads: int = 4, seq: int = 8, batch: int = 1, min_time: float = 2.0):
    import ckpt_ext
    from ckpt_ext import FusedCheckpointBlock

    from .host import POLICIES, make_block, rope_tables
    from .micro_timing import ratio_text, spread_text, time_interleaved

    torch.set_num_threads(1)
    block = make_block(family, d, heads)
    kwargs = {"position_embeddings": rope_tables(seq, d // heads)} if family == "llama" else {}
    x = torch.randn(batch, seq, d, requires_grad=True)
    g = torch.randn_like(x)

    def step(module, backend):
        if backend is None:
            module(x, **kwargs).backward(g)
            return
        with ckpt_ext.set_backend(backend):
            module(x, **kwargs).backward(g)

    table = {"TransformerBlock": functools.partial(step, block, None)}
    for policy in POLICIES:
        table[f"triton {policy}"] = functools.partial(step, FusedCheckpointBlock.from_block(block, policy), "triton")
    launches = {}
    for name, fn in table.items():
        fn()  # warm up: launcher caches, config choice
        LAUNCHES[0] = 0
        fn()
        launches[name] = LAUNCHES[0]
    times = time_interleaved(table, min_time, 7, 3, 5e-3)
    return [dict(variant=name, us=times[name].median * 1e6, step=spread_text(times[name], 1e6),
                 launches=launches[name], vs_eager=ratio_text(times[name], times["TransformerBlock"]))
            for name in table]  # fmt: skip


def format_table(rows: list[dict]) -> str:
    from .micro_timing import markdown_table

    header = ("variant", "µs / step [IQR], launches stubbed", "Triton launches / step", "× eager")
    launches = ["" if r["variant"] == "TransformerBlock" else str(r["launches"]) for r in rows]
    return markdown_table(header, [(r["variant"], r["step"], n, r["vs_eager"]) for r, n in zip(rows, launches)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("gpt2", "llama", "both"), default="both")
    ap.add_argument("--min-time", type=float, default=2.0)
    args = ap.parse_args(argv)
    stub_launches()
    for family in ("gpt2", "llama") if args.family == "both" else (args.family,):
        print(f"\n{family} block d=64 heads=4 T=8 B=1, 1 thread, fp32, triton backend with launches stubbed: "
              "host µs per training step")  # fmt: skip
        print(format_table(run(family, min_time=args.min_time)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
