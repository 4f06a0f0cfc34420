"""``make bench`` / ``python -m bench.microbench``: each op of the block's op graph vs torch eager (and torch.compile).

For every ``ckpt_ext::*`` op (bench.micro_cases), forward and backward, times our op and the torch code doing the same
job: median and 20/80% quantiles (triton.testing.do_bench on GPU; on CPU the providers of a case are timed in one
round-robin loop, bench.micro_timing.time_interleaved, and "eager/this" is the median per-round ratio, or "noisy"
when its spread is wider than the difference), effective GB/s and
TFLOP/s from the op's counted bytes (inputs + outputs) and FLOPs (the same numerator for every provider), and the
modeled H200 roofline time next to them. Appends long-format rows to <out>/microbench.csv, draws <out>/<family>.png
per op family, prints a table. CPU by default (under 5 minutes); ``--device cuda`` on a GPU; ``--compile`` adds
torch.compile (slow to compile on a small CPU, so off by default).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import ckpt_ext
from ckpt_ext.backend import concrete_backend
from ckpt_ext.plan import positive_arg

from .demo import add_threads_option, check_common_args, cpu_name, cpu_threads, new_parser, positive_int
from .micro_cases import Shape, build_cases, known_names, select
from .micro_report import Result, append_csv, plot_family, table
from .micro_timing import Timing, ratio_text, roofline_seconds, time_fn, time_interleaved

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known_names()]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown op {', '.join(unknown)}; choose from {', '.join(known_names())}")
    return names


positive_float = positive_arg(float, "number")


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(
        "microbench",
        "Time each ckpt_ext op (forward and backward) against torch eager and optionally torch.compile; "
        "report GB/s, TFLOP/s and the modeled H200 roofline time; append to a long-format CSV and plot.",
    )
    p.add_argument("--hidden", type=positive_int, default=None, help="FFN width H (default 4 × d)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--ops", type=name_list, default=[], help="comma-separated ops or families (default: all)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the eager code (slow on CPU)")
    p.add_argument("--min-time", type=positive_float, default=0.5, help="seconds of timed calls per measurement")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for microbench.csv and plots")
    p.add_argument("--seed", type=int, default=0, help="seed for the inputs")
    add_threads_option(p)
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    return p


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    args.hidden = args.hidden or 4 * args.d_model
    args.dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"


def versions_string(device: torch.device) -> str:
    parts = [f"ckpt_ext {ckpt_ext.__version__}", f"backend {concrete_backend(device.type)}"]
    parts.append(f"torch {torch.__version__}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    return "; ".join(parts)


def _compiled(fn):
    """torch.compile of a plain Python wrapper (some eager callables are aten op packets, not functions)."""
    return torch.compile(lambda *a: fn(*a), dynamic=False)


def _providers(case, compile_: bool) -> list[tuple[str, object]]:
    fn, args = case.ours
    out = [("ckpt_ext", lambda: fn(*args))]
    efn, eargs = case.eager
    out.append(("eager", lambda: efn(*eargs)))
    if compile_ and case.compilable:
        cfn = _compiled(efn)
        out.append(("compile", lambda: cfn(*eargs)))
    return out


def _time_case(providers, device: torch.device, min_time: float, bar) -> dict[str, Timing]:
    """Timing per provider: on CPU one round-robin loop over the providers that run (a failing torch.compile is
    reported and dropped; any other failure raises), on CUDA do_bench per provider."""
    ok = {}
    for provider, call in providers:
        try:
            call()
        except Exception as err:  # noqa: BLE001  (a failed torch.compile must not lose the other results)
            if provider != "compile":
                raise
            bar.write(f"skipped {provider}: {type(err).__name__}: {err}".splitlines()[0])
            continue
        ok[provider] = call
    if device.type == "cuda":
        return {p: time_fn(call, device, min_time) for p, call in ok.items()}
    return time_interleaved(ok, min_time=min_time * len(ok), min_rounds=5)


def run(args: argparse.Namespace) -> list[Result]:
    device = torch.device(args.device)
    shape = Shape(args.batch, args.seq, args.d_model, args.heads, args.hidden)
    cases = select(build_cases(shape, device, args.dtype, args.seed), args.ops)
    results = []
    with tqdm(total=len(cases), desc="microbench", unit="case", disable=args.no_progress) as bar:
        for case in cases:
            roof = roofline_seconds(case.flops, case.nbytes)
            bar.set_postfix_str(f"{case.op} {case.mode}")
            times = _time_case(_providers(case, args.compile), device, args.min_time, bar)
            bar.update()
            for provider, t in times.items():
                vs = ratio_text(times["eager"], t) if "eager" in times else "-"
                results.append(Result(case.op, case.family, case.mode, provider, str(shape), t.median, t.q20, t.q80,
                                      case.nbytes, case.flops, roof, vs))  # fmt: skip
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    with cpu_threads(args.threads):
        results = run(args)
        name = device_name(device)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "microbench.csv"
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    dtype = str(args.dtype).replace("torch.", "")
    append_csv(csv_path, results, name, f"{versions_string(device)}; {dtype}", stamp)
    plots = []
    for family in dict.fromkeys(r.family for r in results):
        path = args.out / f"{family}.png"
        plot_family(path, family, [r for r in results if r.family == family], name)
        plots.append(path)
    md = table(results)
    sys.stdout.write(f"\nckpt_ext op microbenchmarks ({results[0].shape if results else ''}, {dtype}, "
                     f"{name})\n\n{md}\n\nappended to {csv_path}; plots in {args.out}\n")  # fmt: skip
    return dict(results=results, csv=csv_path, plots=plots, table=md)


if __name__ == "__main__":
    main()
