"""How big a batch (or how long a sequence) fits: the planner's answer for a Hugging Face model, per strategy and head.

``plan_model(config, seq_len=None, batch=None, memory_budget=..., **setup) -> ModelReport``
  seq_len given, batch not: the largest batch per strategy at that sequence length;
  batch given, seq_len not: the longest sequence per strategy at that batch (up to the config's position limit);
  both: the largest batch at seq_len, and whether the given batch fits.
Strategies: no checkpointing (Hugging Face's layer), torch.utils.checkpoint on every 4th / 2nd / every layer (the layers
whose 1-based index is a multiple of k), each ckpt_ext policy on every layer; each with Hugging Face's LM head and with
the fused linear + cross-entropy head (models without an LM head, or with a masked-LM head: one row each). Peak memory
is model state + the activation peak of planner_model.MemoryModel.step; both grow monotonically with batch and sequence,
so the search doubles then bisects. Activations and peak are reported at the answer (at batch or sequence 1 when nothing
fits); the overhead is modeled at B·T ≈ 8192 tokens (planner_model.PRICE_TOKENS) relative to no checkpointing with
Hugging Face's head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .planner_model import MemoryModel, price_batch
from .planner_spec import ModelSpec, Setup, parse_memory
from .policies import POLICIES

_CAP = 1 << 24  # the largest batch the search tries


@dataclass(frozen=True)
class Row:
    label: str
    kinds: tuple[str, ...]
    head: str  # "hf", "fused" or "-" (no LM head)
    answer: int  # max batch or max sequence (0: even 1 does not fit)
    batch: int
    seq: int
    activation_bytes: int
    peak_bytes: int
    overhead: float
    fits_given: Optional[bool] = None  # with batch and seq_len both given: does that batch fit


@dataclass(frozen=True)
class ModelReport:
    spec: ModelSpec
    budget: int
    mode: str  # "batch" (max batch at seq) or "seq" (max sequence at batch)
    seq_len: Optional[int]
    batch: Optional[int]
    rows: tuple[Row, ...]

    def row(self, label: str, head: str) -> Row:
        """The row of strategy ``label`` (as strategies() names it) with ``head``."""
        for r in self.rows:
            if r.label == label and r.head == head:
                return r
        raise KeyError(f"no row {label!r} with head {head!r}")

    def __str__(self) -> str:
        return format_report(self)


def strategies(n_layers: int) -> list[tuple[str, tuple[str, ...]]]:
    rows = [("no checkpointing", ("eager",) * n_layers)]
    for k, name in ((4, "every 4th layer"), (2, "every 2nd layer"), (1, "every layer")):
        rows.append((f"torch checkpoint, {name}", tuple("checkpoint" if i % k == 0 else "eager"
                                                         for i in range(1, n_layers + 1))))  # fmt: skip
    rows += [(f"ckpt_ext {p}", (p,) * n_layers) for p in POLICIES]
    return rows


def _largest(fits, start: int, cap: int) -> int:
    """Largest v in [1, cap] with fits(v) (fits monotone: True then False), 0 if fits(1) is False."""
    if not fits(1):
        return 0
    lo, hi = 1, None
    v = max(2, start)
    while hi is None:
        if v >= cap:
            if fits(cap):
                return cap
            hi = cap
        elif fits(v):
            lo, v = v, 2 * v
        else:
            hi = v
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _largest_verified(fast, exact, start: int, cap: int) -> int:
    """_largest over ``fast`` (interpolated memory), then moved to the boundary of ``exact`` (traced at the point
    itself): bracketed by steps 1, 2, 4, ... away from the fast answer, then bisected."""
    v = _largest(fast, start, cap)
    if v == 0 or exact(v):  # lo fits: look up for the first failure
        lo, step = v, 1
        while lo < cap and exact(min(lo + step, cap)):
            lo, step = min(lo + step, cap), 2 * step
        hi = min(lo + step, cap + 1)
    else:  # v fails: look down for a fit
        hi, step = v, 1
        while hi > 1 and not exact(max(hi - step, 1)):
            hi, step = max(hi - step, 1), 2 * step
        lo = max(hi - step, 1) if exact(max(hi - step, 1)) else 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if exact(mid) else (lo, mid)
    return lo


def plan_model(config, seq_len: Optional[int] = None, batch: Optional[int] = None,
               memory_budget: Union[int, float, str, None] = None, **setup) -> ModelReport:  # fmt: skip
    """The strategy table for a Hugging Face model (see the module docstring); ``setup``: the fields of Setup."""
    budget = parse_memory(memory_budget)
    spec = ModelSpec(config, Setup(**setup))
    for name, v in (("seq_len", seq_len), ("batch", batch)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if spec.family.fixed_seq is not None:
        if seq_len is not None and seq_len != spec.max_seq:
            raise ValueError(f"seq_len: {spec.family.name} sequences are {spec.max_seq} tokens (from image_size and "
                             "patch_size),"
                             f" got {seq_len}")  # fmt: skip
        seq_len = spec.max_seq
    if seq_len is None and batch is None:
        raise ValueError("give seq_len (to get the largest batch) or batch (to get the longest sequence)")
    if seq_len is not None and spec.max_seq is not None and seq_len > spec.max_seq:
        raise ValueError(f"seq_len {seq_len} exceeds the model's {spec.max_seq} positions")
    model, exact = MemoryModel(spec), MemoryModel(spec, exact=True)
    heads = (("hf", "fused") if spec.family.fused_head else ("hf",)) if spec.family.lm_head else ("-",)
    mode = "batch" if seq_len is not None else "seq"
    price_seq = seq_len if seq_len is not None else min(spec.max_seq or 2048, 2048)
    base_time = model.seconds(("eager",) * spec.n_layers, "hf", price_seq)
    rows = []
    for label, kinds in strategies(spec.n_layers):
        for head in heads:
            mem_head = "hf" if head == "-" else head

            def peak(b, t, kinds=kinds, head=mem_head, m=model):
                return spec.state_bytes + m.step(kinds, head, b, t)[1]

            if mode == "batch":
                fits = [lambda b, m=m: peak(b, seq_len, m=m) <= budget for m in (model, exact)]
                answer = _largest_verified(*fits, batch or 8, _CAP)
                b, t = max(answer, 1), seq_len
            else:
                fits = [lambda t, m=m: peak(batch, t, m=m) <= budget for m in (model, exact)]
                answer = _largest_verified(*fits, 512, spec.max_seq or _CAP)
                b, t = batch, max(answer, 1)
            act, _ = exact.step(kinds, mem_head, b, t)
            overhead = model.seconds(kinds, mem_head, price_seq) / base_time - 1.0
            given = peak(batch, seq_len, m=exact) <= budget if batch is not None and seq_len is not None else None
            rows.append(
                Row(label, kinds, head, answer, b, t, act, peak(b, t, m=exact), round(overhead, 9) + 0.0, given)
            )
    return ModelReport(spec, budget, mode, seq_len, batch, tuple(rows))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_report(r: ModelReport) -> str:
    spec, s = r.spec, r.spec.setup
    what = f"max batch at T={r.seq_len}" if r.mode == "batch" else f"max seq at batch {r.batch}"
    col = "max batch" if r.mode == "batch" else "max seq"
    at = "at max" if r.mode == "batch" else "at max seq"
    lines = [
        f"model: {spec.describe()}",
        f"training: {s.describe()}; budget {_gib(r.budget)}; {what}",
        f"model state (weights, grads and optimizer state of the trainable parameters): {_gib(spec.state_bytes)}",
        "",
        f"{'strategy':<34}{'head':<7}{col:>10}{'activations ' + at:>24}{'peak':>12}{'overhead':>10}"
        + ("  fits" if r.rows[0].fits_given is not None else ""),
    ]
    for row in r.rows:
        head = {"hf": "HF", "fused": "fused", "-": "-"}[row.head]
        answer = str(row.answer) if row.answer else "none"
        if r.mode == "seq" and spec.max_seq and row.answer == spec.max_seq:
            answer = f"{answer} (max)"
        line = (f"{row.label:<34}{head:<7}{answer:>10}{_gib(row.activation_bytes):>24}{_gib(row.peak_bytes):>12}"
                f"{row.overhead:>+10.1%}")  # fmt: skip
        if row.fits_given is not None:
            line += f"  {'yes' if row.fits_given else 'no'} (batch {r.batch})"
        lines.append(line)
    pb = price_batch(r.seq_len or min(spec.max_seq or 2048, 2048))
    lines += [
        "",
        _head_note(spec),
        f"Overhead: modeled H200 step time (ckpt_ext.roofline on the model's own layer, batch {pb}) vs no checkpointing"
        " with the HF head. Activations exclude weights, gradients and optimizer state; peak includes them.",
    ]
    return "\n".join(lines)


def _head_note(spec: ModelSpec) -> str:
    s = spec.setup
    if not spec.family.lm_head:
        return "Classifier head (no LM head)."
    if not spec.family.fused_head:
        return ("HF head: Hugging Face's masked-LM head (transform: dense, GELU, LayerNorm; tied decoder) + "
                "cross-entropy over every position (bf16 logits held by the output + fp32 log-probs, ~6·V B/token "
                "kept); no fused-head rows (ckpt_ext's fused loss serves causal LMs).")  # fmt: skip
    return ("HF head: Hugging Face's lm_head + ForCausalLMLoss (bf16 logits held by the output + fp32 log-probs, ~6·V "
            "B/token kept); fused: linear + cross-entropy in chunks (fp32 logsumexp, 4 B/token; chunk budget "
            f"{s.fused_chunk_bytes / 2**20:.0f} MiB).")  # fmt: skip
