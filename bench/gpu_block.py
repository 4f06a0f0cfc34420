"""Time one block's training step per variant, side by side in one run, with peak and retained memory.

    python -m bench.gpu_block [--device cuda|cpu]

Variants: eager TransformerBlock, torch.utils.checkpoint (non-reentrant, reentrant), torch selective checkpointing
(matmuls + attention saved), and FusedCheckpointBlock per policy on the triton backend, all sharing one block's
parameters. Shapes (bf16 parameters and input): d=768 T=1024 B=8 h=12 and d=2048 T=2048 B=4 h=16 (cpu smoke mode:
d=72 T=7 B=2 h=4, fp32, interpreter). Per row: step ms (forward + backward), ratios to eager / checkpoint /
reentrant, the roofline model's overhead for the same variant, torch.cuda.max_memory_allocated over one step above
the parameters and input, and the bytes still allocated after forward (kept for backward), both in MiB and in
multiples of the input's bytes. Writes gpu_block.csv / .md.
"""

from __future__ import annotations

import torch

import ckpt_ext
from ckpt_ext import roofline
from ckpt_ext.block import init_block_

from .gpu_common import cli_main, memory, time_ms

MiB = 2**20


def run(device: str) -> list[dict]:
    if device == "cuda":
        shapes, dtype = ((768, 1024, 8, 12), (2048, 2048, 4, 16)), torch.bfloat16
    else:
        shapes, dtype = ((72, 7, 2, 4),), torch.float32
    rows = []
    for d, t, b, h in shapes:
        block = ckpt_ext.TransformerBlock(d, h).to(device=device, dtype=dtype)
        init_block_(block)
        x = torch.randn(b, t, d, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(b, t, d, device=device, dtype=dtype)
        times = {}
        for variant in roofline.VARIANTS:
            fn = roofline.forward_fn(variant, block)
            with ckpt_ext.set_backend("triton"):
                step = lambda: fn(x).backward(grad)  # noqa: B023 (used within this iteration only)
                times[variant] = time_ms(step, device)
                peak, kept = memory(fn, x, grad, device)
            block.zero_grad(set_to_none=True)
            x.grad = None
            rows.append(dict(shape=f"d={d} T={t} B={b} h={h}", variant=variant, step_ms=times[variant],
                             peak_mib=peak / MiB, kept_mib=kept / MiB,
                             kept_x_input=kept / (x.numel() * x.element_size()),
                             modeled_overhead=roofline.overhead(variant, d, t, b, h, dtype=dtype)))  # fmt: skip
        for row in rows[-len(roofline.VARIANTS) :]:
            row["vs_eager"] = row["step_ms"] / times["eager"]
            row["vs_checkpoint"] = row["step_ms"] / times["checkpoint"]
            row["vs_reentrant"] = row["step_ms"] / times["checkpoint_reentrant"]
            print(row, flush=True)
    return rows


def main(argv=None) -> int:
    return cli_main("gpu_block", __doc__.splitlines()[0], run, "Block step per variant", argv)


if __name__ == "__main__":
    raise SystemExit(main())
