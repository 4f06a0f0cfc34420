"""``python -m bench.block``: one block, every checkpointing strategy (ours and torch's anchors), one run per family.

Families (``--family gpt2|llama|bert|both``; both = gpt2 and llama), defaults at issue 14's / issue 11's size, fp32,
all cores:
    gpt2   TransformerBlock(d=512, 8 heads, d_ff=2048, LayerNorm + GELU), B=4, T=256
    llama  Llama-form TransformerBlock(d=512, 8 heads, 2 kv heads, d_ff=1408, RMSNorm + SwiGLU + RoPE tables),
           B=4, T=256, beside transformers' own LlamaDecoderLayer (sdpa) with the same weights, eager and with
           Hugging Face's gradient checkpointing (its layer hook, reentrant as gradient_checkpointing_enable sets)
    bert   post-LN bidirectional TransformerBlock(d=512, 8 heads, d_ff=2048, LayerNorm eps 1e-12 + erf GELU, separate
           q/k/v), B=4, T=256, beside transformers' own BertLayer (sdpa, dropout 0) with the same weights, eager and
           with Hugging Face's gradient checkpointing; kept bytes against the post-LN policy table
``--lora R`` (PEFT LoRA of rank R on every linear, base weights frozen, as a LoRA fine-tune runs): every row is the
PEFT-adapted block (the HF layer adapted the same way), the ckpt_ext rows run LoRA inside the op graph; no compiled
ckpt_ext rows (LoRA under torch.compile runs the plain model).
Rows: eager block; torch.utils.checkpoint (non-reentrant); torch SAC (create_selective_checkpoint_contexts saving
matmuls + attention, recomputing the rest); torch.compile(block) with torch._functorch.config.activation_memory_budget
1.0 / 0.5 / 0.2 / 0.0; each ckpt_ext policy eager and compiled (inductor, fullgraph).
Columns:
    kept     bytes saved for backward per byte of the block input x (x, parameters, RoPE tables excluded):
             saved_tensors_hooks (bench/saved.py), except rows built on torch.utils.checkpoint (their hooks hide the
             saves from an outer hook), measured as storages made by the forward and alive after it ("S")
    table    what ckpt_ext.policies.retained_bytes predicts for the policy
    FLOPs    one training step (forward + backward) under FlopCounterMode, × the eager block (eager rows only:
             compiled code does not run through the counter)
    step     CPU ms per step (forward + backward): median [25%-75%] of round-robin samples (bench.micro_timing)
    × ...    the paired per-round ratio to the eager block, to torch.utils.checkpoint, and (llama) to the HF layer eager
             and with its gradient checkpointing; "noisy" where the ratio's spread exceeds its distance from 1.
    GEMM ms  the step's share of matrix products (aten mm/addmm/bmm/baddbmm self time / wall time, under torch.profiler
             over a few steps run apart from the timing) × its median step; "rest" = step - GEMM (norms, attention,
             pointwise, host). A share, not the profiled ms, so a machine busier then than during timing cancels.
             On CPU the GEMMs run at the BLAS ceiling, so "rest" is where a variant can win; the floor line under the
             table says what a step-time target needs from it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

import ckpt_ext
from ckpt_ext import FusedCheckpointBlock, TransformerBlock, policies
from ckpt_ext.block import init_block_
from ckpt_ext.lora import BLOCK_LORA_TARGETS, HF_LORA_TARGETS, add_peft_lora
from ckpt_ext.measure import count_flops, retained_activation_bytes
from ckpt_ext.roofline import _selective_context

from . import malloc_tuning
from .micro_timing import ratio_text, spread_text, time_interleaved
from .saved import saved_bytes

POLICIES = tuple(policies.POLICIES)
BUDGETS = (1.0, 0.5, 0.2, 0.0)
SIZES = {
    "gpt2": dict(d_model=512, n_heads=8, n_kv_heads=None, d_ff=2048, batch=4, seq=256),
    "llama": dict(d_model=512, n_heads=8, n_kv_heads=2, d_ff=1408, batch=4, seq=256),
    "bert": dict(d_model=512, n_heads=8, n_kv_heads=None, d_ff=2048, batch=4, seq=256),
}
BERT_EPS = 1e-12


@dataclass
class Variant:
    name: str
    fn: Callable  # x -> out
    policy: Optional[str] = None
    compiled: bool = False
    via_checkpoint: bool = False  # built on torch.utils.checkpoint: measure kept bytes by storage lifetime


def make_block(family: str, d_model: int, n_heads: int, n_kv_heads, d_ff: int) -> TransformerBlock:
    torch.manual_seed(0)
    if family == "llama":
        blk = TransformerBlock(d_model, n_heads, activation="swiglu", n_kv_heads=n_kv_heads, d_ff=d_ff)
    elif family == "bert":
        blk = TransformerBlock(d_model, n_heads, d_ff=d_ff, norm_placement="post", causal=False, packed_qkv=False,
                               eps=BERT_EPS)  # fmt: skip
    else:
        blk = TransformerBlock(d_model, n_heads, d_ff=d_ff)
    init_block_(blk)
    return blk


def rope_tables(seq: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE tables (cos, sin), each (1, T, head_dim), as a Llama model computes them once per forward."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (dh/2,)
    ang = torch.arange(seq, dtype=torch.float32)[:, None] * inv  # (T, dh/2)
    ang = torch.cat([ang, ang], dim=-1)[None]  # (1, T, dh)
    return ang.cos(), ang.sin()


def hf_llama_layer(block: TransformerBlock):
    """transformers' LlamaDecoderLayer (sdpa) holding copies of ``block``'s weights; None without transformers."""
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    except ImportError:
        return None
    cfg = LlamaConfig(hidden_size=block.d_model, intermediate_size=block.hidden, num_attention_heads=block.n_heads,
                      num_key_value_heads=block.n_kv_heads, num_hidden_layers=1, rms_norm_eps=block.eps,
                      head_dim=block.head_dim)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0)
    a, m, hf_a, hf_m = block.attn, block.mlp, layer.self_attn, layer.mlp
    pairs = [(layer.input_layernorm, block.ln_1), (layer.post_attention_layernorm, block.ln_2), (hf_a.q_proj, a.q),
             (hf_a.k_proj, a.k), (hf_a.v_proj, a.v), (hf_a.o_proj, a.proj), (hf_m.gate_proj, m.gate),
             (hf_m.up_proj, m.up), (hf_m.down_proj, m.proj)]  # fmt: skip
    with torch.no_grad():
        for dst, src in pairs:
            dst.weight.copy_(src.weight)
    return layer.train()


def hf_bert_layer(block: TransformerBlock):
    """transformers' BertLayer (sdpa, dropout 0) holding copies of the post-LN ``block``'s weights; None without
    transformers. Post-LN: the block's ln_1 is BERT's attention.output.LayerNorm, ln_2 its output.LayerNorm."""
    try:
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertLayer
    except ImportError:
        return None
    cfg = BertConfig(hidden_size=block.d_model, intermediate_size=block.hidden, num_attention_heads=block.n_heads,
                     num_hidden_layers=1, layer_norm_eps=block.eps, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, hidden_act="gelu")  # fmt: skip
    cfg._attn_implementation = "sdpa"
    layer = BertLayer(cfg)
    att, a, m = layer.attention, block.attn, block.mlp
    pairs = [(att.self.query, a.q), (att.self.key, a.k), (att.self.value, a.v), (att.output.dense, a.proj),
             (att.output.LayerNorm, block.ln_1), (layer.intermediate.dense, m.fc), (layer.output.dense, m.proj),
             (layer.output.LayerNorm, block.ln_2)]  # fmt: skip
    with torch.no_grad():
        for dst, src in pairs:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    return layer.train()


HF_LAYERS = {"llama": hf_llama_layer, "bert": hf_bert_layer}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _budget_backend(budget: float) -> Callable:
    """Inductor with the partitioner's activation_memory_budget set while it partitions. A backend object per budget:
    dynamo guards on the backend, so each budget gets its own compiled graph of the same block."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return compile_fx(gm, example_inputs)

    return backend


def variants(block: TransformerBlock, kw: dict, hf=None, budgets=BUDGETS, compiled_policies=POLICIES) -> list[Variant]:
    """The rows, in print order; ``budgets`` / ``compiled_policies``: which torch.compile rows (empty: none)."""

    def call(module):
        return functools.partial(module, **kw) if kw else module

    out = [Variant("eager block", call(block))]
    if hf is not None:
        hf_ckpt = copy.copy(hf)  # shares submodules; only its checkpointing flag differs
        hf_ckpt.gradient_checkpointing = True
        hf_ckpt._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=True)
        out.append(Variant(f"HF {type(hf).__name__} eager", lambda x: _first(hf(x, **kw))))
        out.append(Variant("HF gradient checkpointing", lambda x: _first(hf_ckpt(x, **kw)), via_checkpoint=True))
    out.append(Variant("torch checkpoint", lambda x: checkpoint(call(block), x, use_reentrant=False),
                       via_checkpoint=True))  # fmt: skip
    sac = lambda x: checkpoint(call(block), x, use_reentrant=False, context_fn=_selective_context)  # noqa: E731
    out.append(Variant("torch SAC (save matmuls + attention)", sac, via_checkpoint=True))
    for budget in budgets:
        fn = torch.compile(call(block), fullgraph=True, backend=_budget_backend(budget))
        out.append(Variant(f"compile, memory budget {budget}", fn, compiled=True))
    for policy in POLICIES:
        out.append(Variant(f"ckpt_ext {policy}", call(FusedCheckpointBlock.from_block(block, policy)), policy))
        if policy in compiled_policies:
            fn = torch.compile(call(FusedCheckpointBlock.from_block(block, policy)), fullgraph=True)
            out.append(Variant(f"ckpt_ext {policy} compiled", fn, policy, compiled=True))
    return out


def _step(fn, x, g):
    fn(x).backward(g)


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def gemm_share(fn, x, g, steps: int = 3) -> float:
    """Fraction of ``steps`` profiled training steps' wall time spent in the GEMM ops (GEMM_OPS, self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            _step(fn, x, g)
        wall_us = (time.perf_counter() - start) * 1e6
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / wall_us


def run(family="gpt2", d_model=512, n_heads=8, n_kv_heads=None, d_ff=2048, batch=4, seq=256, min_time=2.0,
        min_rounds=7, budgets=BUDGETS, compiled_policies=POLICIES, hf=True, lora=0) -> list[dict]:  # fmt: skip
    if lora and family not in BLOCK_LORA_TARGETS:
        raise ValueError(f"lora: not available for --family {family} (choose from {', '.join(BLOCK_LORA_TARGETS)})")
    block = make_block(family, d_model, n_heads, n_kv_heads, d_ff)
    hf_layer = HF_LAYERS[family](block) if family in HF_LAYERS and hf else None
    if lora:
        block = add_peft_lora(block, lora, BLOCK_LORA_TARGETS[family])
        hf_layer = None if hf_layer is None else add_peft_lora(hf_layer, lora, HF_LORA_TARGETS)
        compiled_policies = ()
    kw, exclude = {}, list(block.parameters())
    if family == "llama":
        kw["position_embeddings"] = rope_tables(seq, block.head_dim)
        exclude += list(kw["position_embeddings"])
    table = variants(block, kw, hf_layer, budgets, compiled_policies)
    torch.manual_seed(1)
    x = torch.randn(batch, seq, d_model, requires_grad=True)
    g = torch.randn_like(x)
    in_bytes = x.numel() * x.element_size()
    for v in table:  # compile and warm up before anything is measured
        for _ in range(3):
            _step(v.fn, x, g)
    rows = {}
    for v in table:
        if v.via_checkpoint:
            kept, _ = retained_activation_bytes(v.fn, x)
        else:
            kept, _ = saved_bytes(v.fn, x, exclude=[x, *exclude, *(hf_layer.parameters() if hf_layer else ())])
        predicted = None
        if v.policy is not None:
            shape = dict(n_kv_heads=block.n_kv_heads, head_dim=block.head_dim, norm=block.norm,
                         mlp="swiglu" if family == "llama" else "gelu", placement=block.norm_placement)  # fmt: skip
            predicted = policies.retained_bytes(v.policy, batch, seq, d_model, n_heads, block.hidden, **shape)
        flops = None if v.compiled else count_flops(_step, v.fn, x, g)
        rows[v.name] = dict(variant=v.name, kept=kept / in_bytes, how="S" if v.via_checkpoint else "H",
                            table=None if predicted is None else predicted / in_bytes, flops=flops,
                            gemm_share=gemm_share(v.fn, x, g))  # fmt: skip
    times = time_interleaved({v.name: functools.partial(_step, v.fn, x, g) for v in table}, min_time, min_rounds)
    refs = ["eager block", "torch checkpoint"] + ([f"HF {type(hf_layer).__name__} eager", "HF gradient checkpointing"]
                                                  if hf_layer is not None else [])  # fmt: skip
    eager_flops = rows["eager block"]["flops"]
    for name, row in rows.items():
        row["flops"] = None if row["flops"] is None else row["flops"] / eager_flops
        row["step"] = spread_text(times[name])
        row["timing"] = times[name]
        row["gemm"] = row["gemm_share"] * times[name].median * 1e3
        row["ratios"] = {ref: ratio_text(times[name], times[ref]) for ref in refs}
    return list(rows.values())


REF_LABELS = {"eager block": "× eager block", "torch checkpoint": "× torch ckpt",
              "HF LlamaDecoderLayer eager": "× HF eager", "HF BertLayer eager": "× HF eager",
              "HF gradient checkpointing": "× HF grad ckpt"}  # fmt: skip


def format_table(rows: list[dict]) -> str:
    refs = list(rows[0]["ratios"])
    head = ["variant", "kept (× input)", "table", "FLOPs (× eager)", "step ms [IQR]", "GEMM ms", "rest ms",
            *(REF_LABELS.get(r, f"× {r}") for r in refs)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["variant"],
            f"{r['kept']:.3f} {r['how']}",
            "" if r["table"] is None else f"{r['table']:.3f}",
            "" if r["flops"] is None else f"{r['flops']:.3f}",
            r["step"],
            f"{r['gemm']:.1f}",
            f"{r['timing'].median * 1e3 - r['gemm']:.1f}",  # never negative: the share is at most 1
            *(r["ratios"][ref] for ref in refs),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def floor_line(rows: list[dict], ratio: float = 0.9) -> str:
    """Issue 11's CPU target (block ≤ ``ratio`` × torch checkpoint's step) split into GEMM and rest: the rest time the
    block row may spend given its measured GEMM ms, against what it spends and what the eager block spends without
    any recompute."""
    by = {r["variant"]: r for r in rows}
    if "ckpt_ext block" not in by or "torch checkpoint" not in by:
        return ""
    ckpt, ours, eager = by["torch checkpoint"], by["ckpt_ext block"], by["eager block"]
    budget = ratio * ckpt["timing"].median * 1e3
    rest = lambda r: r["timing"].median * 1e3 - r["gemm"]  # noqa: E731
    return (f"floor: block ≤ {ratio}× torch checkpoint = {budget:.1f} ms; block's GEMMs take {ours['gemm']:.1f} ms "
            f"(torch checkpoint's {ckpt['gemm']:.1f}, the same FLOPs), leaving {budget - ours['gemm']:.1f} ms for the "
            f"rest; block's rest is {rest(ours):.1f} ms, torch checkpoint's {rest(ckpt):.1f}, the eager block's "
            f"(no recompute) {rest(eager):.1f}")  # fmt: skip


def goal_table(rows: list[dict], d_model: int) -> str:
    """Issue 14's goal per anchor: the ckpt_ext rows (eager or compiled) that keep at most the anchor's bytes, with
    their step time as a paired ratio to the anchor's (< 1: faster at no more memory). "At most" allows 4/d × input:
    the block policy's per-row fp32 norm statistics (two norms, mean + rstd), against anchors that keep nothing."""
    slack = 4 / d_model
    anchors = [r for r in rows if r["variant"].startswith(("torch ", "compile, ", "HF gradient"))]
    ours = [r for r in rows if r["variant"].startswith("ckpt_ext ")]
    head = f"| anchor | kept (× input) | ckpt_ext rows keeping ≤ that (+{slack:.3f}): step × anchor |"
    lines = [head, "|---|---|---|"]
    for a in anchors:
        fits = [f"{r['variant'][9:]} {ratio_text(r['timing'], a['timing'])}" for r in ours
                if r["kept"] <= a["kept"] + slack]  # fmt: skip
        lines.append(f"| {a['variant']} | {a['kept']:.3f} | {', '.join(fits) or 'none'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("gpt2", "llama", "bert", "both"), default="both")
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int, help="llama only")
    ap.add_argument("--d-ff", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of interleaved timing (at least 7 rounds)")
    ap.add_argument("--min-rounds", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--lora", type=int, default=0, metavar="R", help="PEFT LoRA of rank R on every linear, base frozen")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    malloc = malloc_tuning.describe(malloc_tuning.keep_freed_memory())
    for family in ("gpt2", "llama") if args.family == "both" else (args.family,):
        size = dict(SIZES[family])
        for key, arg in (("d_model", args.d_model), ("n_heads", args.heads), ("d_ff", args.d_ff),
                         ("seq", args.seq), ("batch", args.batch)):  # fmt: skip
            size[key] = size[key] if arg is None else arg
        if family == "llama" and args.kv_heads is not None:
            size["n_kv_heads"] = args.kv_heads
        compiled = dict(budgets=(), compiled_policies=()) if args.no_compile else {}
        rows = run(family, **size, min_time=args.min_time, min_rounds=args.min_rounds, lora=args.lora, **compiled)
        adapted = f", PEFT LoRA r={args.lora} on every linear (base frozen)" if args.lora else ""
        print(f"\n{family} block {size}{adapted}, fp32, backend {ckpt_ext.backend.concrete_backend('cpu')}, "
              f"{torch.get_num_threads()} threads, {malloc}; kept: H hooks, S storages alive")  # fmt: skip
        print(format_table(rows))
        print()
        print(floor_line(rows))
        print()
        print(goal_table(rows, size["d_model"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
