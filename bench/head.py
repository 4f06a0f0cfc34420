"""The fused LM head (ckpt_ext.linear_cross_entropy) against Hugging Face's loss: memory and time of fwd + bwd.

    python -m bench.head [--quick] [--dtype bf16|fp32] [--vocab V ...] [--tokens N ...] [--dim d] [--no-compile]

For each (V, N) (default V ∈ {50257, 128256}, N ∈ {4096, 16384}, d = 2048, bf16): one loss forward + backward with
hidden (N, d) and weight (V, d) requiring grad, by
    hf        Hugging Face's ForCausalLMLoss path, eager: logits = hidden @ weightᵀ, logits.float(), F.cross_entropy
    compiled  the same function under torch.compile (inductor; compile time excluded: one warm-up call)
    fused     ckpt_ext.linear_cross_entropy (the active backend: the C++ kernel on CPU)
and prints the peak of CPU memory allocated during fwd + bwd above what existed before (the gradients included, for
all three), the CPU time of one fwd + bwd (best of --repeat, measured without the profiler), both as ratios to hf, and
the modeled H200 time (ckpt_ext.roofline's prices: max(FLOPs / 788 TFLOP/s, bytes / 4.3 TB/s) + 3 µs per kernel):
hf from its ops traced under FakeTensorMode; compiled as its three GEMMs plus one fused pass over the bf16 logits in
forward (read them, write the logsumexp) and one in backward (read them, write dlogits); fused as the Triton backend
runs it (a forward kernel reading hidden and weight once; per vocabulary chunk the dz kernel, the dweight and dhidden
GEMMs and, for 16-bit over several chunks, the fp32 dhidden accumulation).
Peak memory: torch.profiler(profile_memory=True)'s exported trace, whose "[memory]" events carry the running total of
CPU bytes allocated ("Total Allocated"); the peak is its maximum minus its level before the first event.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

import ckpt_ext
from ckpt_ext import roofline
from ckpt_ext.lm_head import DEFAULT_CHUNK_BYTES, chunk_len

VOCABS = (50257, 128256)
TOKENS = (4096, 16384)
DIM = 2048
QUICK = dict(vocabs=(1000,), tokens=(256,), dim=64)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def hf_loss(hidden, weight, labels):
    """Hugging Face's causal-LM loss on already-shifted labels: the lm_head GEMM, the fp32 upcast, cross-entropy."""
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


def fused_loss(hidden, weight, labels):
    return ckpt_ext.linear_cross_entropy(hidden, weight, labels)


def peak_cpu_bytes(fn) -> int:
    """Peak CPU bytes allocated while fn() runs, above the level when it started (torch.profiler memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["args"]["Ev Idx"])
    if not memory:
        return 0
    # The running total carries bytes of earlier profiling sessions (blocks they saw allocated but not freed): the
    # level before this session's first event is the baseline.
    base = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in memory) - base)


def _inputs(n, v, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * d**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    return hidden, weight, labels


def _step(loss_fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    loss_fn(hidden, weight, labels).backward()


def measure(loss_fn, n, v, d, dtype, repeat) -> tuple[int, float]:
    """(peak bytes, best seconds) of one fwd + bwd; gradients of earlier calls are freed first."""
    hidden, weight, labels = _inputs(n, v, d, dtype)
    _step(loss_fn, hidden, weight, labels)  # warm-up (and compile)
    hidden.grad = weight.grad = None
    peak = peak_cpu_bytes(lambda: _step(loss_fn, hidden, weight, labels))
    best = float("inf")
    for _ in range(repeat):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        _step(loss_fn, hidden, weight, labels)
        best = min(best, time.perf_counter() - start)
    return peak, best


# ------------------------------------------------------------------------------------------------- H200 model
def model_hf(n, v, d, dtype) -> float:
    """Sum of roofline prices of the ops of hf_loss's fwd + bwd, traced on fake CPU tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hidden = torch.empty(n, d, dtype=dtype).requires_grad_()
        weight = torch.empty(v, d, dtype=dtype).requires_grad_()
        labels = torch.zeros(n, dtype=torch.long)
        recorder = roofline.CostRecorder()
        with recorder:
            loss = hf_loss(hidden, weight, labels)
            recorder.phase = "backward"
            loss.backward()
    return sum(op.seconds for op in recorder.ops)


def _gemm(m, n, k, e) -> float:
    return roofline.price(2 * m * n * k, (m * k + n * k + m * n) * e)


def model_compiled(n, v, d, dtype) -> float:
    e = torch.empty((), dtype=dtype).element_size()
    fwd = _gemm(n, v, d, e) + roofline.price(5 * n * v, n * v * e + 4 * n)
    bwd = roofline.price(5 * n * v, 2 * n * v * e + 4 * n) + _gemm(n, d, v, e) + _gemm(v, d, n, e)
    return fwd + bwd


def model_fused(n, v, d, dtype, chunk_bytes=DEFAULT_CHUNK_BYTES["cuda"]) -> float:
    e = torch.empty((), dtype=dtype).element_size()
    fwd = roofline.price(2 * n * v * d + 5 * n * v, (n * d + v * d) * e + 16 * n)
    cols = chunk_len(chunk_bytes, n, dtype, v)
    bwd = 0.0
    for c0 in range(0, v, cols):
        c = min(cols, v - c0)
        bwd += roofline.price(2 * n * c * d + 5 * n * c, (n * d + c * d + n * c) * e + 12 * n)  # dz kernel
        bwd += _gemm(c, d, n, e) + _gemm(n, d, c, e)  # dweight rows, dhidden partial
        if e < 4 and cols < v:
            bwd += roofline.price(n * d, n * d * (e + 8))  # fp32 dhidden accumulator += this chunk's product
    return fwd + bwd


# ---------------------------------------------------------------------------------------------------- driver
def run(vocabs, tokens, dim, dtype, repeat=1, compile_hf=True) -> list[dict]:
    rows = []
    compiled = torch.compile(hf_loss) if compile_hf else None
    for v in vocabs:
        for n in tokens:
            row = {"V": v, "N": n, "d": dim}
            for name, fn in (("hf", hf_loss), ("compiled", compiled), ("fused", fused_loss)):
                if fn is None:
                    continue
                if name == "compiled":
                    torch._dynamo.reset()
                peak, sec = measure(fn, n, v, dim, dtype, repeat)
                row[f"{name}_peak"], row[f"{name}_s"] = peak, sec
            row["hf_h200_ms"] = model_hf(n, v, dim, dtype) * 1e3
            row["compiled_h200_ms"] = model_compiled(n, v, dim, dtype) * 1e3
            row["fused_h200_ms"] = model_fused(n, v, dim, dtype) * 1e3
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


HEADER = ("    V      N     d | hf peak MB  hf CPU s | compiled peak/time | fused peak/time  (ratio to hf) | "
          "H200 model ms: hf / compiled / fused")  # fmt: skip


def format_row(row: dict) -> str:
    hf_peak, hf_s = row["hf_peak"], row["hf_s"]
    cells = [f"{row['V']:6d} {row['N']:6d} {row['d']:5d} | {hf_peak / 2**20:10.1f} {hf_s:9.3f} |"]
    if "compiled_peak" in row:
        cells.append(f"   {row['compiled_peak'] / hf_peak:6.3f} / {row['compiled_s'] / hf_s:6.3f}    |")
    else:
        cells.append("          -         |")
    cells.append(f" {row['fused_peak'] / hf_peak:6.3f} / {row['fused_s'] / hf_s:6.3f}                |")
    cells.append(f" {row['hf_h200_ms']:8.3f} / {row['compiled_h200_ms']:8.3f} / {row['fused_h200_ms']:8.3f}")
    return "".join(cells)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small size (V=1000, N=256, d=64), for a smoke test")
    parser.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = parser.parse_args(argv)
    vocabs, tokens, dim = args.vocab, args.tokens, args.dim
    if args.quick:
        vocabs, tokens, dim = QUICK["vocabs"], QUICK["tokens"], QUICK["dim"]
    print(f"bench.head: {args.dtype}, backend {ckpt_ext.backend.concrete_backend('cpu')} on CPU, "
          f"{torch.get_num_threads()} threads; peak = CPU bytes allocated during fwd + bwd", flush=True)  # fmt: skip
    print(HEADER, flush=True)
    run(vocabs, tokens, dim, DTYPES[args.dtype], args.repeat, compile_hf=not args.no_compile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
