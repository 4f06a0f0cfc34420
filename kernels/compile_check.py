"""Compile every Triton kernel for a GPU target without a GPU; report registers, spills and shared memory.

    python -m ckpt_ext.kernels.compile_check [--arch 90] [--all-configs]

Each kernel is compiled from its AST (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``) with
16-bit signatures (fp16 and bf16 for the GPT-2 kernels; bf16 and the autocast mix for the Llama-family ones, see
compile_jobs_llama), once per GELU form (linear_dropout_add, which has none, once), for the autotune config with the
most accumulator registers per thread (every config with --all-configs; the dual-GEMM kernels use the DUAL_* lists,
swiglu_ffn_recompute the TRIPLE_* ones); the matmuls also in fp32 (UPCAST, ieee dots, the CKPT_EXT_TRITON_AUTOTUNE=0
configs). The attention kernels come from ``ckpt_ext.kernels.flash_attention.compile_jobs(arch)`` when that module
exists: an iterable of (name, jit fn, signature, constexprs, options[, attrs]) tuples.
Arguments are specialized the way the JIT does for the usual layouts (nn.Linear weights, contiguous activations):
unit strides become the constant 1, and pointers, other strides and the d/H dimensions carry 16-divisibility, so
the compile sees the kernel the GPU will run.
Each cubin's registers, spill bytes (stack frame + local memory) and static shared memory are read with triton's
bundled ``cuobjdump --dump-resource-usage``; shared = dynamic (pipeline buffers) + static.
Must run WITHOUT TRITON_INTERPRET=1 (the interpreter replaces @triton.jit functions); exits non-zero if any kernel
fails to compile or spills. Prints one line per compile:
``[SPILLS ]kernel dtype variant regs=<n> spills=<bytes> shared=<bytes> warps=<n> stages=<n> sm=<arch>``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from .compile_jobs_llama import largest, llama_jobs


def _jobs(arch: int, all_configs: bool):
    """(name, jit fn, signature, constexprs, options) for every kernel × dtype × variant to compile."""
    from . import dropout, layer_norm, pointwise
    from .matmul_configs import DUAL_SINGLE, DUAL_SM80, DUAL_SM90, SINGLE, SM80, SM90

    tile_configs = SM90 if arch >= 90 else SM80
    dual_tile_configs = DUAL_SM90 if arch >= 90 else DUAL_SM80
    tile_configs = tile_configs if all_configs else largest(tile_configs)
    dual_tile_configs = dual_tile_configs if all_configs else largest(dual_tile_configs)
    for dt in ("fp16", "bf16"):
        p, f32 = f"*{dt}", "*fp32"
        row = {"BLOCK_D": 1024}
        yield ("layer_norm_fwd", layer_norm.layer_norm_fwd_kernel,
               dict(X=p, W=p, B=p, Y=p, MEAN=f32, RSTD=f32, stride_x="i32", d="i32", eps="fp32", BLOCK_D="constexpr"),
               row, {"num_warps": 4})  # fmt: skip
        yield ("layer_norm_bwd", layer_norm.layer_norm_bwd_kernel,
               dict(DY=p, X=p, MEAN=f32, RSTD=f32, W=p, B=p, DRES=p, DX=p, Y=p, DW_PART=f32, DB_PART=f32,
                    n_rows="i32", d="i32", stride_x="i32", rows_per_program="i32", HAS_DRES="constexpr",
                    EMIT_Y="constexpr", BLOCK_D="constexpr"),
               {"HAS_DRES": True, "EMIT_Y": True, "BLOCK_D": 1024}, {"num_warps": 4})  # fmt: skip
        for tanh in (False, True):
            gelu = {"APPROX_TANH": tanh, "BLOCK": 1024}
            yield ("bias_gelu", pointwise.bias_gelu_kernel,
                   dict(X=p, BIAS=p, Y=p, numel="i32", H="i32", HAS_BIAS="constexpr", APPROX_TANH="constexpr",
                        BLOCK="constexpr"), {"HAS_BIAS": True, **gelu}, {"num_warps": 4})  # fmt: skip
            yield ("gelu_bwd", pointwise.gelu_bwd_kernel,
                   dict(DA=p, U=p, DU=p, numel="i32", APPROX_TANH="constexpr", BLOCK="constexpr"), gelu,
                   {"num_warps": 4})  # fmt: skip
        yield ("dropout_add", dropout.dropout_add_kernel,
               dict(X=p, RES=p, OUT=p, numel="i32", key="i32", threshold="i32", scale="fp32", HAS_RES="constexpr",
                    APPLY_DROPOUT="constexpr", BLOCK="constexpr"),
               {"HAS_RES": True, "APPLY_DROPOUT": True, "BLOCK": 1024}, {"num_warps": 4})  # fmt: skip
        for tanh in (False, True):
            for cfg in dual_tile_configs:
                yield _dual_matmul_job(p, cfg, tanh, upcast=False)
            for cfg in tile_configs:
                yield from _matmul_jobs(p, cfg, tanh, upcast=False)
        for cfg in tile_configs:
            yield _dropout_matmul_job(p, cfg, upcast=False)
    yield _dual_matmul_job("*fp32", DUAL_SINGLE[0], False, upcast=True)
    yield from _matmul_jobs("*fp32", SINGLE[0], False, upcast=True)
    yield _dropout_matmul_job("*fp32", SINGLE[0], upcast=True)
    yield from llama_jobs(arch, all_configs)
    yield from _attention_jobs(arch)
    yield from _lm_head_jobs(arch)


def _lm_head_jobs(arch: int):
    """The fused LM head's forward and dz kernels (ckpt_ext.kernels.linear_cross_entropy.compile_jobs)."""
    from . import linear_cross_entropy

    yield from linear_cross_entropy.compile_jobs(arch)


def _attention_jobs(arch: int):
    """The attention owner's kernels (ckpt_ext.kernels.flash_attention.compile_jobs(arch), same job tuples), once
    that module exists."""
    try:
        from . import flash_attention
    except ImportError:
        return
    jobs = getattr(flash_attention, "compile_jobs", None)
    if jobs is None:
        return
    try:
        listed = list(jobs(arch))
    except ModuleNotFoundError as exc:  # the attention kernels are landing file by file
        if not (exc.name or "").startswith(f"{__package__}.flash_attention"):
            raise
        print(f"SKIPPED attention jobs: {exc}", flush=True)
        return
    yield from listed


def _dropout_matmul_job(p: str, cfg, upcast: bool):
    """linear_dropout_add (no GELU form): x, w, b, residual and out all in ``p``, bias and dropout on."""
    from . import linear_dropout_add

    const = {**cfg.kwargs, "HAS_BIAS": True, "APPLY_DROPOUT": True, "UPCAST": upcast}
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return ("linear_dropout_add", linear_dropout_add.linear_dropout_add_kernel,
            dict(X=p, W=p, B=p, RES=p, OUT=p, M="i32", N="i32", K="i32", stride_xm="i32", stride_xk="i32",
                 stride_wn="i32", stride_wk="i32", stride_rm="i32", key="i32", threshold="i32", scale="fp32",
                 **{k: "constexpr" for k in const}),
            const, opts)  # fmt: skip


def _dual_matmul_job(p: str, cfg, tanh: bool, upcast: bool):
    from . import ffn_recompute

    f32 = "*fp32"
    const = {**cfg.kwargs, "APPROX_TANH": tanh, "UPCAST": upcast}
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return ("ffn_recompute", ffn_recompute.ffn_recompute_kernel,
            dict(X1=p, MEAN=f32, RSTD=f32, LN_W=p, LN_B=p, W1=p, B1=p, DY=p, W2=p, A_OUT=p, DU_OUT=p, DB1_PART=f32,
                 M="i32", N="i32", K="i32", stride_xm="i32", stride_w1n="i32", stride_w1k="i32", stride_dym="i32",
                 stride_w2k="i32", stride_w2n="i32", **{k: "constexpr" for k in const}),
            const, opts)  # fmt: skip


def _matmul_jobs(p: str, cfg, tanh: bool, upcast: bool):
    from . import act_linear_wgrad, ffn_pointwise, linear_gelu

    const = {**cfg.kwargs, "APPROX_TANH": tanh, "UPCAST": upcast}
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    tiles = {k: "constexpr" for k in const}
    yield ("linear_bias_gelu", linear_gelu.linear_bias_gelu_kernel,
           dict(X=p, W=p, B=p, OUT=p, M="i32", N="i32", K="i32", stride_xm="i32", stride_xk="i32", stride_wn="i32",
                stride_wk="i32", HAS_BIAS="constexpr", **tiles), {"HAS_BIAS": True, **const}, opts)  # fmt: skip
    yield ("linear_gelu_bwd", ffn_pointwise.linear_gelu_bwd_kernel,
           dict(DY=p, W2=p, U=p, DU=p, M="i32", N="i32", K="i32", stride_dym="i32", stride_dyk="i32",
                stride_wk="i32", stride_wn="i32", stride_um="i32", **tiles), const, opts)  # fmt: skip
    wgrad = {**cfg.kwargs, "ACT": "gelu_tanh" if tanh else "gelu", "UPCAST": upcast}
    yield ("gelu_linear_wgrad", act_linear_wgrad.act_linear_wgrad_kernel,
           dict(DY=p, G=p, U=p, DW=p, M="i32", N="i32", K="i32", stride_dyk="i32", stride_dym="i32", stride_gk="i32",
                stride_uk="i32", **{k: "constexpr" for k in wgrad}), wgrad, opts)  # fmt: skip


UNIT_STRIDES = {
    "ffn_recompute": ("stride_w1k", "stride_w2n"),
    "linear_swiglu": ("stride_xk", "stride_wgk", "stride_wuk"),
    "swiglu_linear_bwd": ("stride_dyk", "stride_wn"),
    "swiglu_linear_wgrad": ("stride_dym",),
    "swiglu_ffn_recompute": ("stride_wgk", "stride_wuk", "stride_wdn"),
    "linear_bias_gelu": ("stride_xk", "stride_wk"),
    "linear_dropout_add": ("stride_xk", "stride_wk"),
    "linear_gelu_bwd": ("stride_dyk", "stride_wn"),
    "gelu_linear_wgrad": ("stride_dym",),
}
NOT_DIVISIBLE = ("M", "numel", "n_rows", "rows_per_program", "key", "threshold", "eps", "scale", "T", "hq", "hk",
                 "half", "P")  # fmt: skip


def specialize(name: str, fn, signature: dict, const: dict):
    """Unit strides as constants and 16-divisibility attrs, as the JIT would specialize a typical launch."""
    signature, const = dict(signature), dict(const)
    for arg in UNIT_STRIDES.get(name, ()):
        signature[arg] = "constexpr"
        const[arg] = 1
    attrs = {}
    for arg, ty in signature.items():
        if ty.startswith("*") or (ty == "i32" and arg not in NOT_DIVISIBLE):
            attrs[(fn.arg_names.index(arg),)] = [["tt.divisibility", 16]]
    return signature, const, attrs


def _variant(const: dict) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "APPROX_TANH", "ACT", "APPLY_DROPOUT", "UPCAST", "BLOCK_D")
    return ",".join(f"{k}={const[k]}" for k in keys if k in const)


def resource_usage(cubin: bytes) -> dict:
    """Registers, spill bytes (stack frame + local memory) and static shared memory of a cubin, read with the
    cuobjdump that ships with triton (``--dump-resource-usage``)."""
    import triton

    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([exe, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "spills": stack + local, "static_shared": shared}


def _pointer_attrs(fn, signature: dict) -> dict:
    return {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, ty in signature.items() if ty.startswith("*")}


def _prepared(job):
    """(name, fn, signature, constexprs, attrs, options): our jobs are specialized here; an attention job
    (name, fn, signature, constexprs, options[, attrs]) brings its own attrs or gets 16-aligned pointers only."""
    if len(job) == 6:
        name, fn, signature, const, opts, attrs = job
        return name, fn, signature, const, attrs if attrs is not None else _pointer_attrs(fn, signature), opts
    name, fn, signature, const, opts = job
    signature, const, attrs = specialize(name, fn, signature, const)
    return name, fn, signature, const, attrs, opts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--all-configs", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter cannot compile kernels)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for job in _jobs(args.arch, args.all_configs):
        name, fn, signature, const, attrs, opts = _prepared(job)
        dtype = next((v for v in signature.values() if v in ("*bf16", "*fp16")), "*fp32")[1:]  # the data dtype
        start = time.perf_counter()
        try:
            src = ASTSource(fn=fn, signature=signature, constexprs=const, attrs=attrs)
            compiled = triton.compile(src, target=target, options=opts)
            usage = resource_usage(compiled.asm["cubin"])
        except Exception as exc:  # report every failing kernel, not only the first
            failures += 1
            print(f"FAILED {name} {dtype} {_variant(const)}: {type(exc).__name__}: {exc}", flush=True)
            continue
        md = compiled.metadata
        spilled = usage["spills"] > 0
        failures += spilled
        print(f"{'SPILLS ' if spilled else ''}{name} {dtype} {_variant(const)} regs={usage['regs']} "
              f"spills={usage['spills']} shared={md.shared + usage['static_shared']} warps={md.num_warps} "
              f"stages={md.num_stages} sm={args.arch} ({time.perf_counter() - start:.1f}s)", flush=True)  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
