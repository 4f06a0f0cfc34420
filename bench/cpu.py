"""CPU benchmark of the C++ kernels (`python -m bench.cpu`, from the repo root; not a test).

Part 1: each ckpt_ext C++ kernel op against torch's own CPU op on the same inputs, at N = 4096 rows, d = 768 / 1024
(the GELU ops on (N/4, 4d), as many elements; every tensor below 32 MiB, glibc's largest mmap threshold), fp32 and
bf16: LayerNorm forward (F.layer_norm), LayerNorm backward (autograd through F.layer_norm), GELU backward
(aten.gelu_backward, erf and tanh), bias + GELU (F.gelu(x + b)), residual + dropout (F.dropout(x) + r).
Ratio = torch time / ours (> 1: ours faster).
Part 1b: the fused FFN ops at the block's shape (N = 2048, d = 256, H = 1024) against the same math in torch ops:
ffn_recompute (F.layer_norm, F.linear, dy @ w2, F.gelu, aten.gelu_backward, sum), linear_bias_gelu (F.gelu(F.linear)),
linear_gelu_bwd (mm + gelu_backward), gelu_linear_wgrad (F.gelu + mm). Ours and torch's are timed interleaved (A B A B,
best median of each) since the machine is shared.
Part 2: one training step (forward + backward) of a block, d = 256, T = 256, B = 8, 4 heads, per ckpt_ext policy on
the `cpp` backend, against TransformerBlock and torch.utils.checkpoint(use_reentrant=False) on it, for residual dropout
0.1 and 0, fp32 and bf16 autocast, and GPT-2's dropouts (residual and attention 0.1). The last line of each table is
the block policy's ceiling: a step with no recompute plus the matmuls and attention that any block-level checkpoint
must recompute, timed alone (attention without dropout: a lower bound).
Medians of torch.utils.benchmark's blocked_autorange on --threads threads (default 2; CKPT_EXT_BENCH_THREADS), the
same count the C++ kernels run on (printed), with glibc malloc keeping freed memory (bench/malloc_tuning.py: no
per-step page faults). --part ops|ffn|block runs one part; sizes are flags.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch.utils import benchmark
from torch.utils.checkpoint import checkpoint

import ckpt_ext
from ckpt_ext.block import init_block_
from ckpt_ext.ops import cpp_bridge  # noqa: F401  (loads ckpt_ext._C: the *_kernel ops)

from . import malloc_tuning

K = torch.ops.ckpt_ext
MIN_RUN_S = 0.4


def _ms(fn) -> float:
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=MIN_RUN_S).median * 1e3


def _pair_ms(ours, theirs, rounds: int = 2) -> tuple[float, float]:
    """Best-of-rounds medians of ours and theirs, measured alternately so that load drift hits both alike."""
    a, b = [], []
    for _ in range(rounds):
        a.append(_ms(ours))
        b.append(_ms(theirs))
    return min(a), min(b)


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
    print(f"\n{'fused FFN op':<20}{'dtype':<10}{'N x d x H':<16}{'ours ms':>9}{'torch ms':>10}{'torch/ours':>12}")
    for dtype in (torch.float32, torch.bfloat16):
        for name, ours, theirs in _ffn_cases(n, d, h, dtype):
            a, b = _pair_ms(ours, theirs)
            dt = str(dtype).removeprefix("torch.")
            print(f"{name:<20}{dt:<10}{f'{n}x{d}x{h}':<16}{a:>9.2f}{b:>10.2f}{b / a:>11.2f}x")


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
    print(f"{'op':<18}{'dtype':<10}{'N x d':<13}{'ours ms':>9}{'torch ms':>10}{'torch/ours':>12}")
    for dtype in (torch.float32, torch.bfloat16):
        for n, d in sizes:
            for name, ours, theirs in _op_cases(n, d, dtype):
                a, b = _pair_ms(ours, theirs)
                dt = str(dtype).removeprefix("torch.")
                print(f"{name:<18}{dt:<10}{f'{n}x{d}':<13}{a:>9.2f}{b:>10.2f}{b / a:>11.2f}x")


def _step(module, x, amp: bool, use_checkpoint: bool = False):
    def run():
        xg = x.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = checkpoint(module, xg, use_reentrant=False) if use_checkpoint else module(xg)
        out.backward(torch.ones_like(out))

    return run


def _recompute_floor_ms(block, x, amp: bool) -> float:
    """Time of the matmuls and attention that `block` must recompute (QKV, attention forward, proj, FC1), timed alone.

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

    return _ms(floor)


def bench_block(batch=8, seq=256, d_model=256, n_heads=4, dropout=0.1, amp=False, policies=None, attn_dropout=0.0):
    """One step (forward + backward) per variant; returns {variant: (ms, torch checkpoint ms timed beside it)}."""
    torch.manual_seed(0)
    block = ckpt_ext.TransformerBlock(d_model, n_heads, dropout=dropout, attn_dropout=attn_dropout)
    init_block_(block)
    x = torch.randn(batch, seq, d_model)
    base, ckpt = _pair_ms(_step(block, x, amp), _step(block, x, amp, use_checkpoint=True))
    dtype = "bf16 autocast" if amp else "fp32"
    print(f"\nblock step fwd+bwd, B={batch} T={seq} d={d_model} heads={n_heads} dropout={dropout} "
          f"attn_dropout={attn_dropout} {dtype}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'variant':<34}{'ms':>9}{'vs TransformerBlock':>22}{'vs torch checkpoint':>22}")
    print(f"{'TransformerBlock':<34}{base:>9.2f}{1.0:>21.2f}x{ckpt / base:>21.2f}x")
    print(f"{'torch.utils.checkpoint (non-reent.)':<34}{ckpt:>9.2f}{base / ckpt:>21.2f}x{1.0:>21.2f}x")
    results = {"TransformerBlock": (base, ckpt)}
    with ckpt_ext.set_backend("cpp"):
        for policy in policies or ckpt_ext.POLICIES:
            fused = ckpt_ext.FusedCheckpointBlock.from_block(block, policy=policy)
            # checkpoint is re-timed next to each policy: the ratio compares runs made under the same load.
            t, ckpt_pair = _pair_ms(_step(fused, x, amp), _step(block, x, amp, use_checkpoint=True))
            results[policy] = (t, ckpt_pair)
            print(f"{'cpp policy=' + policy:<34}{t:>9.2f}{base / t:>21.2f}x{ckpt_pair / t:>21.2f}x")
    floor = _recompute_floor_ms(block, x, amp)
    best = min(base, results["none"][0]) if "none" in results else base
    ceiling = best + floor
    ckpt = results["block"][1] if "block" in results else ckpt  # the checkpoint run timed beside the block policy
    print(f"{'block ceiling: no-recompute + floor':<34}{ceiling:>9.2f}{base / ceiling:>21.2f}x{ckpt / ceiling:>21.2f}x"
          f"  (floor: QKV + attention fwd + proj + FC1 alone, {floor:.2f} ms)")  # fmt: skip
    results["ceiling"] = (ceiling, ckpt)
    return results


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
