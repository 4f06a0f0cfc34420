"""The planner for a whole Hugging Face model: from its config and a training setup, the memory of a training step
per checkpointing strategy and LM head, and the largest batch (or sequence) that fits a budget.

Input: a PretrainedConfig, a config.json path (or a folder holding one), or a model (its parameters' requires_grad
then decide what trains). Families (FAMILIES, one entry each; an encoder family is one more entry): GPT-2, Llama,
Mistral, Qwen2, Qwen3 (causal LMs), ViT (image classification). The model is built on the meta device (no memory, no
download) to count parameters exactly (GQA, head_dim, SwiGLU width, biases, tied embeddings as the model ties them).

Training setup (Setup): param_dtype (weights and residual stream), compute_dtype (autocast when it differs; the matmul
outputs), optimizer state bytes per trainable parameter (adamw: two fp32 moments, 8 B; adamw_8bit 2 B; sgd 0;
sgd_momentum 4; or a number), master_weights (an fp32 copy of each trainable parameter, default on when params are
16-bit), LoRA (rank r on the named linear layers of every block, "all-linear" by default: frozen base weights keep only
their weights; each adapter pair trains r·(in + out) parameters, and keeps its (N, r) down-projection output, N = B·T),
keep_logits (the caller holds ``outputs.logits`` through backward, as ``out = model(...); out.loss.backward()``
does), fused_chunk_bytes (the fused head's chunk budget).

Memory of one step (bytes; N = B·T tokens, d width, V vocabulary, act = param dtype bytes, mm = compute dtype bytes):
  state       every parameter's weight bytes + per trainable parameter: its gradient (param dtype), optimizer state,
              fp32 master copy.
  layers      per layer its input x (N·d·act) + what its kind keeps: ckpt_ext policies from the policy table
              (policies.py), Hugging Face's own layer ("eager") and torch.utils.checkpoint traced under fake tensors at
              batch 1 (planner_trace.py; bytes scale with the batch) + LoRA (N·r·mm per adapter; none under torch
              checkpoint).
  embedding   the embedding dropout's mask (N·d bool) when that dropout is on.
  HF head     final norm (traced) + lm_head's saved input (N·d·mm) + labels (N·8) + the autocast bf16 copy of the
              head weight (V·d·2) + logits (mm·V per token, held by the output when keep_logits) + fp32 log-probs
              (4·V, saved by log_softmax; ``logits.float()`` in ForCausalLMLoss); in backward the loss gradient and the
              log-softmax gradient (2 × 4·V) are alive at once beside them: ~6·V retained, ~14·V at the peak in bf16.
  fused head  final norm + fp32 logsumexp (4 B/token) + labels; in backward one chunk buffer (fused_chunk_bytes, at
              most the (N, V) fp32 logits) and
              the hidden-state gradient (N·d·act). No (N, V) tensor.
  peak        state + max(embedding + all layers + head peak, max over layers i of embedding + layers before i +
              layer i's traced peak during its backward (recompute, gradients)).
Modeled time: one forward + backward of each layer kind priced by ckpt_ext.roofline on the model's own layer (fake
trace) at B·T ≈ 8192 tokens (a GPU-filling size), plus the head (3 matmuls + 6 passes over (N, V) for Hugging Face's;
4 matmuls + 2 chunked passes for the fused head); overhead is relative to no checkpointing with Hugging Face's head.
Embeddings are not priced.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .policies import POLICIES, retained_bytes

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = {"adamw": 8, "adamw_8bit": 2, "sgd": 0, "sgd_momentum": 4}
PRICE_TOKENS = 8192


@dataclass(frozen=True)
class Family:
    """One model family: how to build it, where its final norm is, and its block's form for the policy table."""

    name: str
    model_types: tuple[str, ...]
    auto_class: str  # transformers Auto* class that builds the training model
    final_norm: str  # attribute path of the final norm on that model
    norm: str  # "layernorm" or "rmsnorm" (policy table)
    mlp: str  # "gelu" or "swiglu" (policy table)
    rope: bool  # layers take (cos, sin) position embeddings
    lm_head: bool  # an LM head over vocab_size (else a small classifier)
    qk_norm: bool = False
    embed_dropout: Optional[str] = None  # config attribute of the embedding dropout probability
    causal_mask: bool = False  # the model hands its layers a (B, 1, T, T) bool causal mask (transformers 4.57 does)
    fixed_seq: Optional[Callable[[Any], int]] = None  # sequence length set by the config (ViT: patches + 1)


FAMILIES = (
    Family("GPT-2", ("gpt2",), "AutoModelForCausalLM", "transformer.ln_f", "layernorm", "gelu", False, True,
           embed_dropout="embd_pdrop", causal_mask=True),
    Family("Llama", ("llama", "mistral", "qwen2"), "AutoModelForCausalLM", "model.norm", "rmsnorm", "swiglu", True,
           True, causal_mask=True),
    Family("Qwen3", ("qwen3",), "AutoModelForCausalLM", "model.norm", "rmsnorm", "swiglu", True, True, qk_norm=True,
           causal_mask=True),
    Family("ViT", ("vit",), "AutoModelForImageClassification", "vit.layernorm", "layernorm", "gelu", False, False,
           embed_dropout="hidden_dropout_prob", fixed_seq=lambda c: (c.image_size // c.patch_size) ** 2 + 1),
)  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """The training setup (see the module docstring for what each field costs)."""

    param_dtype: str = "fp32"
    compute_dtype: str = "bf16"
    optimizer: Union[str, float] = "adamw"
    master_weights: Optional[bool] = None
    lora_rank: int = 0
    lora_targets: Union[str, tuple[str, ...]] = "all-linear"
    keep_logits: bool = True
    fused_chunk_bytes: int = 256 * 2**20

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in _BYTES:
                raise ValueError(f"{name} must be one of {', '.join(_BYTES)}, got {getattr(self, name)!r}")
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)} or bytes per parameter, "
                             f"got {self.optimizer!r}")  # fmt: skip
        number = isinstance(self.optimizer, (int, float)) and not isinstance(self.optimizer, bool)
        if not isinstance(self.optimizer, str) and not (
            number and math.isfinite(self.optimizer) and self.optimizer >= 0
        ):
            raise ValueError(f"optimizer bytes per parameter must be a finite number >= 0, got {self.optimizer!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0, got {self.lora_rank!r}")
        if isinstance(self.fused_chunk_bytes, bool) or not isinstance(self.fused_chunk_bytes, int) or \
                self.fused_chunk_bytes < 1:  # fmt: skip
            raise ValueError(f"fused_chunk_bytes must be a positive int, got {self.fused_chunk_bytes!r}")

    @property
    def act(self) -> int:
        return _BYTES[self.param_dtype]

    @property
    def mm(self) -> int:
        return _BYTES[self.compute_dtype] if self.compute_dtype != self.param_dtype else self.act

    @property
    def optimizer_bytes(self) -> float:
        return OPTIMIZERS[self.optimizer] if isinstance(self.optimizer, str) else float(self.optimizer)

    @property
    def master(self) -> bool:
        return self.act < 4 if self.master_weights is None else bool(self.master_weights)

    def describe(self) -> str:
        autocast = f"autocast {self.compute_dtype}" if self.compute_dtype != self.param_dtype else "no autocast"
        opt = self.optimizer if isinstance(self.optimizer, str) else "custom"
        state = f"{opt} {self.optimizer_bytes:g} B/param" + (" + fp32 master" if self.master else "")
        lora = f", LoRA r={self.lora_rank} on {self.lora_targets}" if self.lora_rank else ""
        return f"params {self.param_dtype}, {autocast}, {state}{lora}"


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"config: model_type {model_type!r} is not supported by the planner; supported: {known}")


def load_config(source):
    """(config, model or None) from a PretrainedConfig, a config.json path or folder, or a model with ``.config``."""
    try:
        from transformers import AutoConfig, PretrainedConfig
    except ImportError as e:
        raise ImportError("planning from a Hugging Face config needs transformers") from e
    if isinstance(source, PretrainedConfig):
        return source, None
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        if not isinstance(config, PretrainedConfig):
            raise TypeError(f"config: {type(source).__name__} has no Hugging Face .config")
        return config, source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config: no such file {path!r}")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or "model_type" not in data:
            raise ValueError(f"config: {path!r} has no model_type")
        data = dict(data)
        return AutoConfig.for_model(data.pop("model_type"), **data), None
    raise TypeError(f"config must be a PretrainedConfig, a config.json path or a model, got {type(source).__name__}")


def _linear_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in, out) features of an nn.Linear or GPT-2's Conv1D (weight (in, out)); None otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


class ModelSpec:
    """A model's shapes and parameter counts, read from its config (and the model, when given)."""

    def __init__(self, source, setup: Setup):
        from .integrations.hf_common import unfused_class
        from .integrations.huggingface import FAMILIES as ADAPTERS

        config, model = load_config(source)
        self.family = family_of(config)
        self.config, self.setup = config, setup
        if model is None:
            import transformers

            with torch.device("meta"):
                model = getattr(transformers, self.family.auto_class).from_config(config)
        classes = tuple(c for a in ADAPTERS for c in a.layer_classes())
        self.layers = [m for m in model.modules() if isinstance(m, classes)]
        if not self.layers:
            raise ValueError(f"config: found no transformer layers in {type(model).__name__}")
        template = self.layers[0]
        original = unfused_class(type(template))
        if original is not None:  # a converted model: trace the layer as written
            import copy

            template = copy.copy(template)
            template.__class__ = original
        self.template = template
        self.norm_module = model.get_submodule(self.family.final_norm)
        self.n_layers = len(self.layers)
        self.matmul_weights = sum(p.numel() for p in template.parameters() if p.dim() >= 2)  # per layer
        self.d = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or self.d // self.n_heads
        self.hidden = self._mlp_width(template)
        self.vocab = getattr(config, "vocab_size", 0) if self.family.lm_head else 0
        self.tied = bool(getattr(config, "tie_word_embeddings", False)) and self.family.lm_head
        self.max_seq = self._max_seq(config)
        self.embed_dropout = float(getattr(config, self.family.embed_dropout, 0.0) or 0.0) \
            if self.family.embed_dropout else 0.0  # fmt: skip
        self._count(model, given=not any(p.is_meta for p in model.parameters()))

    def _mlp_width(self, layer) -> int:
        cfg = self.config
        width = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
        return int(width) if width else 4 * self.d

    def _max_seq(self, cfg) -> Optional[int]:
        if self.family.fixed_seq is not None:
            return self.family.fixed_seq(cfg)
        for name in ("n_positions", "max_position_embeddings"):
            if getattr(cfg, name, None):
                return int(getattr(cfg, name))
        return None

    def _count(self, model: nn.Module, given: bool) -> None:
        """Total and trainable parameter counts (parameters shared by tying counted once) and the LoRA adapters."""
        params = {id(p): p for p in model.parameters()}
        self.total_params = sum(p.numel() for p in params.values())
        s = self.setup
        self.lora_modules = 0
        if s.lora_rank:
            shapes = [sh for layer in self.layers for name, m in layer.named_modules()
                      if (sh := _linear_shape(m)) is not None and self._targeted(name)]  # fmt: skip
            if not shapes:
                raise ValueError(f"lora_targets: {s.lora_targets!r} matches no linear layer of the blocks")
            self.lora_modules = len(shapes) // self.n_layers
            self.lora_params = sum(s.lora_rank * (i + o) for i, o in shapes)
            self.trainable_params = self.lora_params
            self.total_params += self.lora_params
        else:
            self.lora_params = 0
            trainable = [p for p in params.values() if p.requires_grad] if given else list(params.values())
            self.trainable_params = sum(p.numel() for p in trainable)

    def _targeted(self, name: str) -> bool:
        targets = self.setup.lora_targets
        if targets == "all-linear":
            return True
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        return name.rsplit(".", 1)[-1] in targets

    @property
    def state_bytes(self) -> int:
        s = self.setup
        per_trainable = s.act + s.optimizer_bytes + (4 if s.master else 0)
        return int(self.total_params * s.act + self.trainable_params * per_trainable)

    def describe(self) -> str:
        head = f"V={self.vocab}{' tied' if self.tied else ''}" if self.family.lm_head else "classifier head"
        kv = f", {self.n_kv} kv heads" if self.n_kv != self.n_heads else ""
        return (f"{self.family.name} ({self.config.model_type}): {self.n_layers} layers, d={self.d}, {self.n_heads} "
                f"heads{kv}, head_dim {self.head_dim}, MLP {self.hidden} ({self.family.mlp}), {head}, "
                f"{self.total_params / 1e6:.1f}M params ({self.trainable_params / 1e6:.2f}M trainable)")  # fmt: skip


KINDS = ("eager", "checkpoint", *POLICIES)


class MemoryModel:
    """Bytes and modeled seconds of one step of ``spec`` under ``setup`` (see the module docstring)."""

    def __init__(self, spec: ModelSpec, exact: bool = False):
        """``exact``: trace every (batch, T) asked for instead of interpolating (slower; the search verifies its
        answer this way, since a peak, a maximum over the step, is quadratic in T only piecewise)."""
        self.spec, self.setup, self.exact = spec, spec.setup, exact
        self._rope = spec.head_dim if spec.family.rope else None

    # ---- per layer: every traced tensor is (fixed or) batch x (1, T or T^2) elements, so bytes are affine in the batch
    # and quadratic in T: traces at batch 1, 2 and T = 64, 128, 192 give them exactly at any (batch, T).
    def _traced(self, kind: str, seq: int, batch: int, field: str) -> int:
        from .planner_trace import trace_layer

        s, mask = self.setup, self.spec.family.causal_mask

        def at(b, t):
            trace = trace_layer(self.spec.template, kind, t, s.param_dtype, s.compute_dtype, self._rope, b, mask)
            return getattr(trace, field)

        return at(batch, seq) if self.exact else _bilinear_quadratic(at, batch, seq)

    def layer_bytes(self, kind: str, batch: int, seq: int) -> int:
        """Activation bytes one ``kind`` layer keeps, its input included."""
        sp, s = self.spec, self.setup
        n = batch * seq
        x = n * sp.d * s.act
        lora = 0 if kind == "checkpoint" else sp.lora_modules * n * s.lora_rank * s.mm
        if kind in POLICIES:
            kept = retained_bytes(kind, batch, seq, sp.d, sp.n_heads, sp.hidden, act_bytes=s.act, matmul_bytes=s.mm,
                                  stat_bytes=4, n_kv_heads=sp.n_kv, head_dim=sp.head_dim, norm=sp.family.norm,
                                  mlp=sp.family.mlp, qk_norm=sp.family.qk_norm)  # fmt: skip
        elif kind in ("eager", "checkpoint"):
            kept = self._traced(kind, seq, batch, "retained")
        else:
            raise ValueError(f"unknown layer kind {kind!r}; choose one of {', '.join(KINDS)}")
        return x + kept + lora

    def layer_peak(self, kind: str, batch: int, seq: int) -> int:
        """Bytes alive while one ``kind`` layer runs its backward: its input, kept bytes, recompute and gradients."""
        sp, s = self.spec, self.setup
        n = batch * seq
        lora = 0 if kind == "checkpoint" else sp.lora_modules * n * s.lora_rank * s.mm
        return n * sp.d * s.act + self._traced(kind, seq, batch, "peak") + lora

    # ---- embedding and head
    def embed_bytes(self, kinds: tuple[str, ...], batch: int, seq: int) -> int:
        """The embedding dropout's mask, and the model's (B, 1, T, T) bool mask when torch checkpoint keeps it as an
        input of the layers it wraps."""
        dropout = batch * seq * self.spec.d if self.spec.embed_dropout > 0 else 0
        mask = batch * seq * seq if self.spec.family.causal_mask and "checkpoint" in kinds else 0
        return dropout + mask

    def _norm_bytes(self, seq: int, batch: int) -> int:
        from .planner_trace import trace_module

        s = self.setup
        return _bilinear_quadratic(lambda b, t: trace_module(self.spec.norm_module, t, self.spec.d, s.param_dtype,
                                                             s.compute_dtype, b), batch, seq)  # fmt: skip

    def head_bytes(self, head: str, batch: int, seq: int) -> tuple[int, int]:
        """(kept after forward, alive at the head's backward peak) of the final norm, head and loss."""
        sp, s = self.spec, self.setup
        n = batch * seq
        base = n * sp.d * s.act + self._norm_bytes(seq, batch)  # the last layer's output, the norm's saved tensors
        if not sp.family.lm_head:
            return base + n * sp.d * s.act, base + 2 * n * sp.d * s.act
        v = sp.vocab
        labels = n * 8
        if head == "fused":
            kept = base + n * sp.d * s.act + labels + 4 * n  # norm output (the op's input), labels, fp32 logsumexp
            return kept, kept + min(s.fused_chunk_bytes, 4 * n * v) + n * sp.d * s.act
        if head != "hf":
            raise ValueError(f"head must be 'hf' or 'fused', got {head!r}")
        weight_copy = v * sp.d * 2 if s.mm < s.act else 0
        logits = (s.mm if s.keep_logits else 0) * n * v
        kept = base + n * sp.d * s.mm + labels + weight_copy + logits + 4 * n * v
        return kept, kept + 8 * n * v

    # ---- a whole strategy
    def step(self, kinds: tuple[str, ...], head: str, batch: int, seq: int) -> tuple[int, int]:
        """(activation bytes kept after forward, activation peak of the step) for per-layer ``kinds``."""
        embed = self.embed_bytes(kinds, batch, seq)
        kept = {k: self.layer_bytes(k, batch, seq) for k in set(kinds)}
        peak = {k: self.layer_peak(k, batch, seq) for k in set(kinds)}
        head_kept, head_peak = self.head_bytes(head, batch, seq)
        layers = sum(kept[k] for k in kinds)
        before, layer_phase = 0, 0
        for k in kinds:
            layer_phase = max(layer_phase, before + peak[k])
            before += kept[k]
        held = self.held_logits(head, batch, seq)  # the caller's outputs.logits outlive the head's backward
        forward = layers + kinds.count("checkpoint") * self.cached_copies() + self.head_forward(head, batch, seq)
        return embed + layers + head_kept, embed + max(forward, layers + head_peak, layer_phase + held)

    def cached_copies(self) -> int:
        """Autocast caches the 16-bit copy of every weight it casts until the forward leaves autocast: a torch-
        checkpointed layer saves none of them, yet they are alive at the end of the forward."""
        s = self.setup
        return 2 * self.spec.matmul_weights if s.mm < s.act else 0

    def head_forward(self, head: str, batch: int, seq: int) -> int:
        """Bytes of the head alive at the end of its forward: what it keeps, plus ForCausalLMLoss's fp32 copy of the
        logits (logits.float()) and the logits themselves when the caller does not hold them."""
        sp, s = self.spec, self.setup
        kept = self.head_bytes(head, batch, seq)[0]
        if head != "hf" or not sp.family.lm_head:
            return kept
        n = batch * seq
        return kept + n * sp.vocab * ((4 if s.mm != 4 else 0) + (0 if s.keep_logits else s.mm))

    def held_logits(self, head: str, batch: int, seq: int) -> int:
        sp, s = self.spec, self.setup
        if head != "hf" or not sp.family.lm_head or not s.keep_logits:
            return 0
        return batch * seq * sp.vocab * s.mm

    # ---- time
    def layer_seconds(self, kind: str, seq: int) -> float:
        from .planner_trace import layer_seconds

        s = self.setup
        return layer_seconds(self.spec.template, kind, seq, price_batch(seq), s.param_dtype, s.compute_dtype,
                             self._rope, self.spec.family.causal_mask)  # fmt: skip

    def head_seconds(self, head: str, seq: int) -> float:
        from .roofline import price

        sp, s = self.spec, self.setup
        if not sp.family.lm_head:
            return 0.0
        n, v, d = price_batch(seq) * seq, sp.vocab, sp.d
        matmul = price(2 * n * d * v, (n * d + v * d) * s.mm + n * v * (4 if head == "fused" else s.mm))
        if head == "fused":
            return 4 * matmul + price(0, 8 * n * v) + price(0, 12 * n * v)
        cast = 2 * price(0, n * v * (s.mm + 4)) if s.mm != 4 else 0.0
        return 3 * matmul + cast + price(0, 8 * n * v) + price(0, 4 * n * v) + price(0, 12 * n * v)

    def seconds(self, kinds: tuple[str, ...], head: str, seq: int) -> float:
        return sum(self.layer_seconds(k, seq) for k in kinds) + self.head_seconds(head, seq)


_SEQS = (64, 128, 192)


def _bilinear_quadratic(at, batch: int, seq: int) -> int:
    """f(batch, seq) from f at batch 1, 2 and seq 64, 128, 192, for f affine in the batch and quadratic in seq
    (Lagrange interpolation in exact integer arithmetic; f itself where the result is not an integer)."""
    from fractions import Fraction

    def in_seq(b: int) -> Fraction:
        total = Fraction(0)
        for i, ti in enumerate(_SEQS):
            weight = Fraction(1)
            for j, tj in enumerate(_SEQS):
                if j != i:
                    weight *= Fraction(seq - tj, ti - tj)
            total += weight * at(b, ti)
        return total

    one, two = in_seq(1), in_seq(2)
    value = one + (batch - 1) * (two - one)
    if value.denominator != 1:  # not of that form (some layer picks another path by size): trace the point itself
        return at(batch, seq)
    return int(value)


def price_batch(seq: int) -> int:
    return max(1, round(PRICE_TOKENS / seq))
