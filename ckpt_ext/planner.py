"""The memory-budget planner: per-layer checkpointing policies that minimize step time within a GPU memory budget.

``plan(d_model, n_layers, n_heads, seq_len, batch, memory_budget, dtype="bf16", mlp_ratio=4.0) -> Plan``
``plan(config, seq_len=..., memory_budget=..., batch=None, **setup) -> planner_fit.ModelReport``: a Hugging Face model
(config, config.json path or model) with embeddings, LM head, optimizer and LoRA; the largest batch (or sequence) per
strategy. Its memory model is planner_model.py's; the rest of this docstring is the GPT-2-shaped block planner.

Memory model (bytes; N = batch * seq_len tokens, H = mlp_ratio * d_model):
  per layer      x (the block input, N*d residual-stream values) + policies.retained_bytes(kind) of the policy table;
                 torch eager = the "none" row (measured equal on CPU), a torch-checkpointed block keeps only x.
  workspace      backward rebuilds one layer at a time: the largest set of tensors one layer's kind rebuilds
                 (what "none" keeps minus what it keeps; all of it for torch checkpointing).
  model state    STATE_BYTES_PER_PARAM = 16 bytes per block parameter: fp32 master weights, fp32 grads and Adam's
                 two fp32 moments (mixed precision keeps fp32 master weights). Embeddings, the LM head and their
                 logits are not counted: the planner does not know the vocabulary.
  peak           model state + activations of all layers + workspace; a plan fits when peak <= memory_budget.
dtype: "bf16"/"fp16" = autocast training (residual stream and LayerNorm outputs fp32, act_bytes=4; matmul outputs
16-bit, matmul_bytes=2; statistics fp32); "fp32": everything 4 bytes.

Time model: ckpt_ext.roofline.step_time(kind, ...) per layer (modeled seconds of one fwd+bwd of one block on an
H200); overhead = sum over layers / (n_layers * step_time("eager")) - 1.

Search (exact, planner_search.py): layers are identical, so a plan is a count of layers per option; the fastest count
vector that fits wins (ties: less memory). The options are "block", "block_keep_attn", "ffn", "pointwise" and a "keep
everything" choice: our "none" policy, or torch "eager" (block left unconverted) when that models faster. Heavier
checkpointing goes to the first layers in the returned list.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cache
from typing import Optional, Union

import torch

from .planner_search import fastest_mix, leanest_mix
from .planner_spec import parse_memory
from .policies import POLICIES, retained_bytes, tensor_bytes

STATE_BYTES_PER_PARAM = 16
DTYPES = {
    "fp32": (torch.float32, dict(act_bytes=4, matmul_bytes=4, stat_bytes=4)),
    "bf16": (torch.bfloat16, dict(act_bytes=4, matmul_bytes=2, stat_bytes=4)),
    "fp16": (torch.float16, dict(act_bytes=4, matmul_bytes=2, stat_bytes=4)),
}
TORCH_KINDS = ("eager", "checkpoint")
ORDER = ("checkpoint", "block", "block_keep_attn", "ffn", "pointwise", "none", "eager")  # heaviest checkpointing first


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    batch: int
    dtype: str = "bf16"
    mlp_ratio: float = 4.0

    @property
    def hidden(self) -> int:
        return int(self.mlp_ratio * self.d_model)

    @property
    def params_per_layer(self) -> int:
        d, h = self.d_model, self.hidden
        return 4 * d * d + 2 * d * h + (3 * d + d + h + d) + 4 * d  # weights, biases, two LayerNorms

    @property
    def state_bytes(self) -> int:
        return STATE_BYTES_PER_PARAM * self.params_per_layer * self.n_layers

    def _bytes(self, policy: str) -> int:
        sizes = DTYPES[self.dtype][1]
        return retained_bytes(policy, self.batch, self.seq_len, self.d_model, self.n_heads, self.hidden, **sizes)

    def layer_bytes(self, kind: str) -> int:
        """Activation bytes one layer of ``kind`` (a policy, "eager" or "checkpoint") keeps, its input included."""
        x = tensor_bytes("x", self.batch, self.seq_len, self.d_model, self.n_heads, self.hidden,
                         **DTYPES[self.dtype][1])  # fmt: skip
        if kind == "checkpoint":
            return x
        return x + self._bytes("none" if kind == "eager" else kind)

    def workspace_bytes(self, kind: str) -> int:
        """Bytes one layer of ``kind`` rebuilds during its backward."""
        if kind == "checkpoint":
            return self._bytes("none")
        return 0 if kind == "eager" else self._bytes("none") - self._bytes(kind)

    def step_time(self, kind: str) -> float:
        return _step_time(kind, self.d_model, self.seq_len, self.batch, self.n_heads, self.dtype, self.mlp_ratio)


@dataclass(frozen=True)
class Plan:
    """A per-layer assignment and what it costs. ``fits`` is False when even the leanest plan exceeds the budget."""

    policies: tuple[str, ...]
    activation_bytes: int
    workspace_bytes: int
    state_bytes: int
    overhead: float
    budget_bytes: int
    fits: bool
    message: str = field(default="", compare=False)

    @property
    def peak_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes + self.workspace_bytes

    def layout(self) -> str:
        """Run-length form of ``policies``: "0-22 pointwise, 23 eager"."""
        runs, start = [], 0
        for i in range(1, len(self.policies) + 1):
            if i == len(self.policies) or self.policies[i] != self.policies[start]:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                runs.append(f"{span} {self.policies[start]}")
                start = i
        return ", ".join(runs)

    def summary(self) -> str:
        counts = {k: self.policies.count(k) for k in ORDER if k in self.policies}
        return ", ".join(f"{k} x{n}" for k, n in counts.items())

    def __str__(self) -> str:
        return self.message


def evaluate(shape: Shape, kinds, budget: int) -> Plan:
    """Memory and modeled overhead of one per-layer assignment (policies and/or torch kinds)."""
    kinds = tuple(kinds)
    if len(kinds) != shape.n_layers:
        raise ValueError(f"expected {shape.n_layers} per-layer kinds, got {len(kinds)}")
    counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}  # each distinct kind priced once
    act = sum(n * shape.layer_bytes(k) for k, n in counts.items())
    work = max(shape.workspace_bytes(k) for k in counts)
    ratio = sum(n * shape.step_time(k) for k, n in counts.items()) / (shape.n_layers * shape.step_time("eager"))
    overhead = round(ratio - 1.0, 9) + 0.0  # no "-0.0%" from rounding noise
    fits = shape.state_bytes + act + work <= budget
    return Plan(kinds, act, work, shape.state_bytes, overhead, budget, fits)


def plan(
    d_model,
    n_layers: Optional[int] = None,
    n_heads: Optional[int] = None,
    seq_len: Optional[int] = None,
    batch: Optional[int] = None,
    memory_budget: Union[int, float, str, None] = None,
    dtype: str = "bf16",
    mlp_ratio: float = 4.0,
    **setup,
):
    """The per-layer policies with the least modeled overhead whose peak memory fits ``memory_budget`` (a Plan).

    With a Hugging Face config, config.json path or model as the first argument: the largest batch at ``seq_len``
    (or the longest sequence at ``batch``) per strategy and LM head, a planner_fit.ModelReport; ``dtype`` is then the
    compute (autocast) dtype and ``setup`` takes planner_spec.Setup's fields (param_dtype, optimizer, lora_rank,
    ...)."""
    if _is_model_source(d_model):
        if n_layers is not None or n_heads is not None:
            raise TypeError("plan(config, ...): pass seq_len=, batch= and memory_budget= as keywords")
        from .planner_fit import plan_model

        setup.setdefault("compute_dtype", _dtype_name(dtype))
        return plan_model(d_model, seq_len=seq_len, batch=batch, memory_budget=memory_budget, **setup)
    if setup:
        raise TypeError(f"plan() got unexpected keyword arguments {', '.join(setup)} (they need a model config)")
    shape = make_shape(d_model, n_layers, n_heads, seq_len, batch, dtype, mlp_ratio)
    budget = parse_memory(memory_budget)
    keep_all = "eager" if shape.step_time("eager") < shape.step_time("none") else "none"
    options = ("block", "block_keep_attn", "ffn", "pointwise", keep_all)
    mem = [shape.layer_bytes(k) for k in options]
    work = [shape.workspace_bytes(k) for k in options]
    time = [shape.step_time(k) for k in options]
    counts = fastest_mix(n_layers, mem, work, time, budget - shape.state_bytes)
    if counts is None:
        counts = leanest_mix(n_layers, mem, work, time)
    return _with_message(evaluate(shape, [k for k, n in zip(options, counts) for _ in range(n)], budget), shape)


def _is_model_source(value) -> bool:
    """A Hugging Face config, a path to a config.json (or its folder), or a model."""
    if isinstance(value, (str, os.PathLike)) or isinstance(value, torch.nn.Module):
        return True
    return any(c.__name__ == "PretrainedConfig" for c in type(value).__mro__)


def strategies(shape: Shape) -> list[tuple[str, tuple[str, ...]]]:
    """The seed article's strategies for this model: (label, per-layer kinds)."""
    n = shape.n_layers
    rows = [("no checkpointing (torch)", ("eager",) * n)]
    for k in (4, 2):
        rows.append((f"every {k}th layer (torch)".replace("2th", "2nd"), tuple(
            "checkpoint" if i % k == 0 else "eager" for i in range(1, n + 1))))  # fmt: skip
    rows.append(("every layer, block-level (torch)", ("checkpoint",) * n))
    rows += [(f"ckpt_ext policy={p}", (p,) * n) for p in POLICIES]
    return rows


def make_shape(d_model, n_layers, n_heads, seq_len, batch, dtype="bf16", mlp_ratio=4.0) -> Shape:
    dtype = _dtype_name(dtype)
    for name, v in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads), ("seq_len", seq_len),
                    ("batch", batch)):  # fmt: skip
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if d_model % n_heads:
        raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)):
        raise TypeError(f"mlp_ratio must be a number, got {type(mlp_ratio).__name__}")
    if not (math.isfinite(mlp_ratio) and int(mlp_ratio * d_model) >= 1):
        raise ValueError(f"mlp_ratio must be positive and give an MLP width >= 1, got {mlp_ratio!r}")
    return Shape(d_model, n_layers, n_heads, seq_len, batch, dtype, float(mlp_ratio))


def _dtype_name(dtype) -> str:
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", "float32": "fp32",
             "bfloat16": "bf16", "float16": "fp16"}  # fmt: skip
    name = names.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return name


def _with_message(p: Plan, shape: Shape) -> Plan:
    if p.fits:
        msg = (f"{p.summary()}: activations {gib(p.activation_bytes)}, peak {gib(p.peak_bytes)} of "
               f"{gib(p.budget_bytes)}, modeled overhead {p.overhead:+.1%}")  # fmt: skip
    else:
        msg = (f"budget cannot be met: {gib(p.budget_bytes)} < {gib(p.peak_bytes)} needed by the leanest plan "
               f"({p.summary()}: model state {gib(p.state_bytes)} + activations {gib(p.activation_bytes)} + "
               f"workspace {gib(p.workspace_bytes)}); reduce batch or sequence length, or shard (FSDP)")  # fmt: skip
    return Plan(p.policies, p.activation_bytes, p.workspace_bytes, p.state_bytes, p.overhead, p.budget_bytes, p.fits,
                msg)  # fmt: skip


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _load_step_time():
    """ckpt_ext.roofline.step_time, imported on first use (tests replace this function with a stub)."""
    from .roofline import step_time

    return step_time


@cache
def _cached_step_time(loader, kind, d_model, seq, batch, n_heads, dtype, mlp_ratio) -> float:
    return float(loader()(kind, d_model, seq, batch, n_heads, dtype=DTYPES[dtype][0], mlp_ratio=mlp_ratio))


def _step_time(kind, d_model, seq, batch, n_heads, dtype, mlp_ratio) -> float:
    if kind not in POLICIES and kind not in TORCH_KINDS:
        raise ValueError(f"unknown layer kind {kind!r}")
    return _cached_step_time(_load_step_time, kind, d_model, seq, batch, n_heads, dtype, mlp_ratio)
