"""CPU attention kernels side by side: ckpt_ext's cpu_gqa route (csrc/cpu/attention_cpu.cpp) against aten's CPU flash
kernel (what SDPA and torch.utils.checkpoint run on CPU), forward and backward, fp32, no mask.

    python -m bench.cpu_attention [--threads N] [--min-time S]

Shapes (B, T, h, hk, dh, causal, packed): the Llama bench.block layer (4, 256, 8, 2, 64), its MHA twin (GPT-2 form), a
longer sequence (1, 1024, 8, 2, 64), the same 1024 tokens packed as 4 sequences of 256 (segment ids: aten's kernel
gets them as the additive (B, 1, T, S) -inf mask the cpu_flash route would build, ours reads the ids and skips the
other sequences' keys), a non-causal ViT-like one and a BERT-base-like encoder batch (8, 256, 12, 12, 64) with right
padding (kept lengths T, 3T/4, T/2, T/4 per four rows; packed = "pad"): aten's kernel gets the additive (B, 1, 1, S)
key mask the encoder adapters handed over before key ids, ours the key ids (1 kept, -1 padded: padded rows still
attend) and skips the padded key tiles. Each round times every variant once in turn (interleaved);
medians over rounds, the ratio aten / ours (> 1: ours faster) and the useful GFLOP/s (causal: half the score matrix).
Both kernels get the same (B, T, h, dh) tensors; aten's reads them as (B, h, T, dh) transposed views, as the
cpu_flash route does, and its outputs are made contiguous in (B, T, h, dh) (the layout the block consumes).
"""

from __future__ import annotations

import argparse
import time

import torch

from .malloc_tuning import describe, keep_freed_memory
from .micro_timing import summarize

SHAPES = [(4, 256, 8, 2, 64, True, 1), (4, 256, 8, 8, 64, True, 1), (1, 1024, 8, 2, 64, True, 1),
          (1, 1024, 8, 2, 64, True, 4), (8, 197, 12, 12, 64, False, 1), (8, 256, 12, 12, 64, False, "pad")]  # fmt: skip
PAD_FRACTIONS = (1.0, 0.75, 0.5, 0.25)  # kept share of T per batch row, cycled (the "pad" layout)


def _kept_lengths(b: int, t: int) -> list[int]:
    return [int(t * PAD_FRACTIONS[i % len(PAD_FRACTIONS)]) for i in range(b)]


def _attention_flops(b, t, h, dh, causal, packed) -> int:
    """Useful forward matmul FLOPs (q kᵀ and p v) of ``packed`` equal sequences per row (or, "pad", every query row
    against its row's kept keys); backward is 2x this. Causal counts the lower triangle only."""
    if packed == "pad":
        return 4 * h * dh * t * sum(_kept_lengths(b, t))
    n = t // packed
    pairs = n * (n + 1) // 2 if causal else n * n
    return 4 * b * h * packed * pairs * dh


def _variants(b, t, h, hk, dh, causal, packed):
    from ckpt_ext import segments

    ops = torch.ops.ckpt_ext
    q, k, v = torch.randn(b, t, h, dh), torch.randn(b, t, hk, dh), torch.randn(b, t, hk, dh)
    dout, scale = torch.randn(b, t, h, dh), dh**-0.5
    ids = None
    mask = None
    if packed == "pad":
        keep = torch.arange(t)[None, :] < torch.tensor(_kept_lengths(b, t))[:, None]  # (B, T)
        ids = segments.from_key_mask(keep)  # (B, T): 1 kept, -1 padded
        mask = torch.zeros(b, 1, 1, t).masked_fill_(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    elif packed > 1:
        ids = (torch.arange(t) // (t // packed) + 1).to(torch.int32).expand(b, t).contiguous()  # (B, T)
        mask = torch.zeros(b, 1, t, t).masked_fill_(~segments.visibility(ids), float("-inf"))  # (B, 1, T, S)
    tr = lambda x: x.transpose(1, 2)  # noqa: E731

    def aten_fwd():
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(tr(q), tr(k), tr(v), 0.0, causal,
                                                                            attn_mask=mask, scale=scale)  # fmt: skip
        return tr(o).contiguous(), lse

    a_out, a_lse = aten_fwd()

    def aten_bwd():
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            tr(dout), tr(q), tr(k), tr(v), tr(a_out), a_lse, 0.0, causal, attn_mask=mask, scale=scale
        )
        return [tr(g).contiguous() for g in grads]

    o_out, o_lse = ops.cpu_gqa_attention_fwd(q, k, v, causal, scale, ids)
    return {
        "aten flash fwd": aten_fwd,
        "cpu_gqa fwd": lambda: ops.cpu_gqa_attention_fwd(q, k, v, causal, scale, ids),
        "aten flash bwd": aten_bwd,
        "cpu_gqa bwd": lambda: ops.cpu_gqa_attention_bwd(dout, q, k, v, o_out, o_lse, causal, scale, ids),
    }


def run(min_time: float = 1.0) -> list[dict]:
    from ckpt_ext.backends import aten_attention

    if not aten_attention._cpu_gqa_available():
        raise SystemExit("bench.cpu_attention: ckpt_ext._C has no cpu_gqa kernels (no BLAS sgemm_ found)")
    rows = []
    for shape in SHAPES:
        fns = _variants(*shape)
        for f in fns.values():
            f()
        samples = {name: [] for name in fns}
        start = time.perf_counter()
        while time.perf_counter() - start < min_time or len(samples["aten flash fwd"]) < 5:
            for name, f in fns.items():
                t0 = time.perf_counter()
                f()
                samples[name].append(time.perf_counter() - t0)
        b, t, h, hk, dh, causal, packed = shape
        flops = _attention_flops(b, t, h, dh, causal, packed)
        med = {name: summarize(s).median for name, s in samples.items()}
        for part, mult in (("fwd", 1), ("bwd", 2)):
            aten, ours = med[f"aten flash {part}"], med[f"cpu_gqa {part}"]
            rows.append(dict(shape=shape, part=part, aten_ms=aten * 1e3, ours_ms=ours * 1e3, ratio=aten / ours,
                             aten_gflops=mult * flops / aten / 1e9, ours_gflops=mult * flops / ours / 1e9))  # fmt: skip
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| B, T, h, hk, dh, causal, packed | pass | aten flash ms | cpu_gqa ms | aten / ours | GFLOP/s aten | ours |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = ", ".join(str(x) for x in r["shape"])
        lines.append(f"| {shape} | {r['part']} | {r['aten_ms']:.2f} | {r['ours_ms']:.2f} | {r['ratio']:.2f}x | "
                     f"{r['aten_gflops']:.0f} | {r['ours_gflops']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of rounds per shape")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = describe(keep_freed_memory())
    print(f"# CPU attention, fp32, {torch.get_num_threads()} threads, {malloc}, torch {torch.__version__}")
    print(format_table(run(args.min_time)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
