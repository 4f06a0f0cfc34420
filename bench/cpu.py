"""CPU benchmark of the C++ kernels (`python -m bench.cpu`, from the repo root; not a test).

Part 1: each ckpt_ext C++ kernel op against torch's own CPU op on the same inputs, at N = 4096 rows, d = 768 / 1024
(the GELU ops on (N/4, 4d), as many elements; every tensor below 32 MiB, glibc's largest mmap threshold), fp32 and
bf16: LayerNorm forward (F.layer_norm), LayerNorm backward (autograd through F.layer_norm), GELU backward
(aten.gelu_backward, erf and tanh), bias + GELU (F.gelu(x + b)), residual + dropout (F.dropout(x) + r).
Ratio = torch time / ours (> 1: ours faster).
Part 1b: the fused FFN ops at the block's shape (N = 2048, d = 256, H = 1024) against the same math in torch ops:
ffn_recompute (F.layer_norm, F.linear, dy @ w2, F.gelu, aten.gelu_backward, sum), linear_bias_gelu (F.gelu(F.linear)),
linear_gelu_bwd (mm + gelu_backward), gelu_linear_wgrad (F.gelu + mm).
Part 2: one training step (forward + backward) of a block, d = 256, T = 256, B = 8, 4 heads, per ckpt_ext policy on
the `cpp` backend, against TransformerBlock and torch.utils.checkpoint(use_reentrant=False) on it, for residual dropout
0.1 and 0, fp32 and bf16 autocast, and GPT-2's dropouts (residual and attention 0.1). The last line of each table is
the block policy's ceiling: a step with no recompute plus the matmuls and attention that any block-level checkpoint
must recompute, timed alone (attention without dropout: a lower bound).
Timing (bench/micro_timing.time_interleaved): every variant of a table is timed in one round-robin loop (one sample of
each per round, the order rotated), so load on the shared machine hits them alike; times are "median [q25-q75]" ms and
a ratio is the median of the per-round ratios, printed only when their IQR is narrower than the ratio's distance from
1 ("noisy" otherwise). --threads threads (default 2; CKPT_EXT_BENCH_THREADS), the same count the C++ kernels run on
(printed), with glibc malloc keeping freed memory (bench/malloc_tuning.py: no per-step page faults). --part
ops|ffn|block runs one part; sizes are flags; --min-time is seconds of timing per variant.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import ckpt_ext
from ckpt_ext.backends.cpp import bridge  # noqa: F401  (loads ckpt_ext._C: the *_kernel ops)
from ckpt_ext.block import init_block_

from . import malloc_tuning
from .micro_timing import Timing, ratio_text, spread_text, summarize, time_interleaved

K = torch.ops.ckpt_ext
MIN_RUN_S = 0.4


def _time(fns: dict) -> dict[str, Timing]:
    """Every variant in one round-robin loop, MIN_RUN_S seconds per variant (at least 5 rounds)."""
    return time_interleaved(fns, min_time=MIN_RUN_S * len(fns), min_rounds=5, warmup=1)


def _pair_row(name: str, dtype: torch.dtype, size: str, ours, theirs, width: int) -> str:
    t = _time({"ours": ours, "torch": theirs})
    dt = str(dtype).removeprefix("torch.")
    return (f"{name:<{width}}{dt:<10}{size:<16}{spread_text(t['ours']):>26}{spread_text(t['torch']):>26}"
            f"{ratio_text(t['torch'], t['ours']):>12}")  # fmt: skip


def _pair_header(first: str, width: int) -> str:
    return f"{first:<{width}}{'dtype':<10}{'size':<16}{'ours ms [IQR]':>26}{'torch ms [IQR]':>26}{'torch/ours':>12}"


def _ffn_cases(n: int, d: int, h: int, dtype: torch.dtype):
    """(name, ours, torch's) closures for the fused FFN ops, erf GELU."""
    x1, lw, lb = torch.randn(n, d, dtype=dtype), torch.randn(d, dtype=dtype), torch.randn(d, dtype=dtype)
    _, mean, rstd = K.layer_norm_fwd_kernel(x1, lw, lb, 1e-5)
    w1, b1 = torch.randn(h, d, dtype=dtype) * d**-0.5, torch.randn(h, dtype=dtype)
    w2 = torch.randn(d, h, dtype=dtype) * h**-0.5
    u, dy = torch.randn(n, h, dtype=dtype), torch.randn(n, d, dtype=dtype)

    def torch_recompute():
        uu = F.linear(F.layer_norm(x1, (d,), lw, lb, 1e-5), w1, b1)
        du = torch.ops.aten.gelu_backward(dy @ w2, uu)
        return F.gelu(uu), du, du.float().sum(0)

    return [
        ("ffn_recompute", lambda: K.ffn_recompute_kernel(x1, mean, rstd, lw, lb, w1, b1, dy, w2, "none"),
         torch_recompute),
        ("linear_bias_gelu", lambda: K.linear_bias_gelu_kernel(x1, w1, b1, "none"),
         lambda: F.gelu(F.linear(x1, w1, b1))),
        ("linear_gelu_bwd", lambda: K.linear_gelu_bwd_kernel(dy, w2, u, "none"),
         lambda: torch.ops.aten.gelu_backward(dy @ w2, u)),
        ("gelu_linear_wgrad", lambda: K.gelu_linear_wgrad_kernel(dy, u, "none"), lambda: dy.t() @ F.gelu(u)),
    ]  # fmt: skip


def bench_ffn_ops(n: int = 2048, d: int = 256, h: int = 1024) -> None:
    print("\n" + _pair_header("fused FFN op", 20))
    for dtype in (torch.float32, torch.bfloat16):
        for name, ours, theirs in _ffn_cases(n, d, h, dtype):
            print(_pair_row(name, dtype, f"{n}x{d}x{h}", ours, theirs, 20))


def _op_cases(n: int, d: int, dtype: torch.dtype):
    """(name, ours, torch's) closures on shared inputs."""
    x = torch.randn(n, d, dtype=dtype)
    w, b = torch.randn(d, dtype=dtype), torch.randn(d, dtype=dtype)
    dy = torch.randn(n, d, dtype=dtype)
    _, mean, rstd = K.layer_norm_fwd_kernel(x, w, b, 1e-5)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    yg = F.layer_norm(xg, (d,), wg, bg, 1e-5)
    u = torch.randn(n // 4, 4 * d, dtype=dtype)  # the FFN hidden: as many elements as (n, d)
    du, b4 = torch.randn_like(u), torch.randn(4 * d, dtype=dtype)
    return [
        ("layer_norm fwd", lambda: K.layer_norm_fwd_kernel(x, w, b, 1e-5), lambda: F.layer_norm(x, (d,), w, b, 1e-5)),
        ("layer_norm bwd", lambda: K.layer_norm_bwd_kernel(dy, x, mean, rstd, w, b, None, False),
         lambda: torch.autograd.grad(yg, (xg, wg, bg), dy, retain_graph=True)),
        ("gelu bwd (erf)", lambda: K.gelu_bwd_kernel(du, u, "none"),
         lambda: torch.ops.aten.gelu_backward(du, u, approximate="none")),
        ("gelu bwd (tanh)", lambda: K.gelu_bwd_kernel(du, u, "tanh"),
         lambda: torch.ops.aten.gelu_backward(du, u, approximate="tanh")),
        ("bias+gelu (erf)", lambda: K.bias_gelu_kernel(u, b4, "none"), lambda: F.gelu(u + b4)),
        ("dropout+add", lambda: K.dropout_add_kernel(x, dy, 0.1, 7), lambda: F.dropout(x, 0.1) + dy),
    ]  # fmt: skip


def bench_ops(sizes=((4096, 768), (4096, 1024))) -> None:
    print(_pair_header("op", 18))
    for dtype in (torch.float32, torch.bfloat16):
        for n, d in sizes:
            for name, ours, theirs in _op_cases(n, d, dtype):
                print(_pair_row(name, dtype, f"{n}x{d}", ours, theirs, 18))


def _step(module, x, amp: bool, use_checkpoint: bool = False):
    def run():
        xg = x.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = checkpoint(module, xg, use_reentrant=False) if use_checkpoint else module(xg)
        out.backward(torch.ones_like(out))

    return run


def _recompute_floor(block, x, amp: bool):
    """The matmuls and attention that `block` must recompute (QKV, attention forward, proj, FC1), as one callable.

    The block policy can be no faster than (a graph with no recompute) + this floor: the ceiling of its speedup
    over torch.utils.checkpoint, which recomputes the same matmuls (its early stop skips FC2, as we do).
    """
    b, t, d = x.shape
    h = block.n_heads
    y = torch.randn(b * t, d)
    q = k = v = torch.randn(b, h, t, d // h)
    w_qkv, w_p, w_fc = block.attn.qkv, block.attn.proj, block.mlp.fc
    parts = (
        lambda: w_qkv(y),
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=block.causal),
        lambda: w_p(y),
        lambda: w_fc(y),
    )

    def floor():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            for part in parts:
                part()

    return floor


BASE, CKPT = "TransformerBlock", "torch.utils.checkpoint (non-reent.)"


def bench_block(batch=8, seq=256, d_model=256, n_heads=4, dropout=0.1, amp=False, policies=None, attn_dropout=0.0):
    """One step (forward + backward) per variant, all variants in one round-robin loop; returns {row: Timing}
    (rows: TransformerBlock, torch checkpoint, "cpp policy=<p>", the block ceiling)."""
    torch.manual_seed(0)
    block = ckpt_ext.TransformerBlock(d_model, n_heads, dropout=dropout, attn_dropout=attn_dropout)
    init_block_(block)
    x = torch.randn(batch, seq, d_model)
    policies = list(policies or ckpt_ext.POLICIES)
    variants = {BASE: _step(block, x, amp), CKPT: _step(block, x, amp, use_checkpoint=True)}
    for policy in policies:
        variants[f"cpp policy={policy}"] = _step(ckpt_ext.FusedCheckpointBlock.from_block(block, policy=policy), x, amp)
    variants["floor"] = _recompute_floor(block, x, amp)
    with ckpt_ext.set_backend("cpp"):
        times = _time(variants)
    floor = times.pop("floor")
    keep_all = [times[BASE].samples] + ([times["cpp policy=none"].samples] if "none" in policies else [])
    times["block ceiling: no-recompute + floor"] = summarize(  # per round: the faster no-recompute step + the floor
        [min(steps) + f for *steps, f in zip(*keep_all, floor.samples)]
    )
    dtype = "bf16 autocast" if amp else "fp32"
    print(
        f"\nblock step fwd+bwd, B={batch} T={seq} d={d_model} heads={n_heads} dropout={dropout} "
        f"attn_dropout={attn_dropout} {dtype}, {torch.get_num_threads()} threads, {len(floor.samples)} rounds"
    )
    print(f"{'variant':<36}{'ms [IQR]':>26}{'vs TransformerBlock':>21}{'vs torch checkpoint':>21}")
    for name, t in times.items():
        print(f"{name:<36}{spread_text(t):>26}{ratio_text(times[BASE], t):>21}{ratio_text(times[CKPT], t):>21}")
    print(f"(floor: QKV + attention fwd + proj + FC1 alone, {spread_text(floor)} ms; ratios > 1: the row is faster; "
          "noisy: the per-round ratios' IQR is wider than the difference)")  # fmt: skip
    return times


# (residual dropout, attention dropout, bf16 autocast); the first is GPT-2's (resid_pdrop = attn_pdrop = 0.1)
BLOCK_CONFIGS = ((0.1, 0.1, False), (0.1, 0.0, False), (0.0, 0.0, False), (0.1, 0.0, True), (0.0, 0.0, True))


def main(argv=None) -> None:
    global MIN_RUN_S
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("CKPT_EXT_BENCH_THREADS", "2")))
    ap.add_argument("--part", choices=("all", "ops", "ffn", "block"), default="all")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--min-time", type=float, default=MIN_RUN_S, help="seconds per timing (blocked_autorange)")
    args = ap.parse_args(argv)
    previous = (MIN_RUN_S, torch.get_num_threads())
    MIN_RUN_S = args.min_time
    torch.set_num_threads(args.threads)
    try:
        malloc = malloc_tuning.describe(malloc_tuning.keep_freed_memory())
        print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
              f"{torch.get_num_threads()} threads (C++ kernels on {K.cpu_threads_used()}), {malloc}\n")  # fmt: skip
        if args.part in ("all", "ops"):
            bench_ops()
        if args.part in ("all", "ffn"):
            bench_ffn_ops(n=args.batch * args.seq, d=args.d_model, h=4 * args.d_model)
        if args.part in ("all", "block"):
            for dropout, attn_dropout, amp in BLOCK_CONFIGS:
                bench_block(args.batch, args.seq, args.d_model, args.heads, dropout, amp, attn_dropout=attn_dropout)
    finally:
        MIN_RUN_S = previous[0]
        torch.set_num_threads(previous[1])


if __name__ == "__main__":
    main()
