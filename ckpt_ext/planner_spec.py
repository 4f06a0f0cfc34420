"""What the planner reads from a Hugging Face model: its family, shapes and parameter counts, and the training setup.

Input: a PretrainedConfig, a config.json path (or a folder holding one), or a model (its parameters' requires_grad then
decide what trains). Families (FAMILIES, one entry each; an encoder family such as BERT is one more entry: its Auto
class, final norm path, norm and MLP form, and whether the model hands its layers a causal mask): GPT-2, Llama, Mistral,
Qwen2, Qwen3 (causal LMs), ViT (image classification), BERT (BertForMaskedLM: post-LN layers priced with
policies.POST_LN_POLICIES; the "final norm" is the MLM head's transform (dense, GELU, LayerNorm) before the tied
decoder, whose logits and loss are priced as the causal LMs' Hugging Face head; the embeddings' LayerNorm keeps its
input and statistics; no fused head: ckpt_ext's fused loss serves causal LMs only; a config whose architectures name
BertForSequenceClassification gets the classifier entry: pooler and classifier, no LM head). The model is built on the
meta device (no memory, no download) to count parameters exactly (GQA, head_dim, SwiGLU width, biases, tied embeddings
as the model ties them); the first transformer layer (found by the Hugging Face adapters' layer classes) is the template
the planner traces.

Setup: param_dtype (weights and residual stream), compute_dtype (autocast when it differs; the matmul outputs),
optimizer state bytes per trainable parameter (adamw: two fp32 moments, 8 B; adamw_8bit 2 B; sgd 0; sgd_momentum 4;
or a number), master_weights (an fp32 copy of each trainable parameter, default on when params are 16-bit), LoRA
(rank r on the named linear layers of every block, "all-linear" by default: frozen base weights keep only their
weights, each adapter pair trains r·(in + out) parameters), keep_logits (the caller holds ``outputs.logits`` through
backward, as ``out = model(...); out.loss.backward()`` does), fused_chunk_bytes (the fused head's chunk budget).
State bytes: every parameter's weight bytes + per trainable parameter its gradient (param dtype), optimizer state and
fp32 master copy.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = {"adamw": 8, "adamw_8bit": 2, "sgd": 0, "sgd_momentum": 4}


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
    placement: str = "pre"  # "pre" or "post" (post-LN encoders): which policy table prices the fused layers
    fused_head: bool = True  # the fused linear + cross-entropy head applies (causal LMs; not a masked-LM head)
    embed_norm: Optional[str] = None  # attribute path of a LayerNorm over the embeddings (BERT), else None
    architectures: tuple[str, ...] = ()  # config.architectures this entry is for (empty: any)
    pooled: bool = False  # a classifier head reading one token of the last layer's output (no (N, d) norm output)


FAMILIES = (
    Family("GPT-2", ("gpt2",), "AutoModelForCausalLM", "transformer.ln_f", "layernorm", "gelu", False, True,
           embed_dropout="embd_pdrop", causal_mask=True),
    Family("Llama", ("llama", "mistral", "qwen2"), "AutoModelForCausalLM", "model.norm", "rmsnorm", "swiglu", True,
           True, causal_mask=True),
    Family("Qwen3", ("qwen3",), "AutoModelForCausalLM", "model.norm", "rmsnorm", "swiglu", True, True, qk_norm=True,
           causal_mask=True),
    Family("ViT", ("vit",), "AutoModelForImageClassification", "vit.layernorm", "layernorm", "gelu", False, False,
           embed_dropout="hidden_dropout_prob", fixed_seq=lambda c: (c.image_size // c.patch_size) ** 2 + 1),
    Family("BERT", ("bert",), "AutoModelForSequenceClassification", "bert.pooler", "layernorm", "gelu", False, False,
           embed_dropout="hidden_dropout_prob", placement="post", embed_norm="bert.embeddings.LayerNorm",
           architectures=("BertForSequenceClassification",), pooled=True),
    Family("BERT", ("bert",), "AutoModelForMaskedLM", "cls.predictions.transform", "layernorm", "gelu", False, True,
           embed_dropout="hidden_dropout_prob", placement="post", fused_head=False,
           embed_norm="bert.embeddings.LayerNorm"),
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


def family_of(config, model: Optional[nn.Module] = None) -> Family:
    """The FAMILIES entry for ``config`` (an entry naming architectures: one of them in config.architectures or the
    given model's class name)."""
    model_type = getattr(config, "model_type", None)
    archs = set(getattr(config, "architectures", None) or ()) | ({type(model).__name__} if model is not None else set())
    for fam in FAMILIES:
        if model_type in fam.model_types and (not fam.architectures or archs & set(fam.architectures)):
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
        self.family = family_of(config, model)
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
        self.embed_norm_module = model.get_submodule(self.family.embed_norm) if self.family.embed_norm else None
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


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}  # fmt: skip


def parse_memory(value: Union[int, float, str], name: str = "memory_budget") -> int:
    """Bytes from an int/float or a string: "24GiB", "80GB", "512 MiB", "24G", "1e3GB" (bare K/M/G/T are binary).

    Errors are ValueError/TypeError naming ``name`` (the argument being read)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{name} must be bytes (int) or a string such as '24GiB', got {type(value).__name__}")
    original = value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"cannot read {name} {value!r} as a memory size; use bytes or e.g. '24GiB', '80GB', '1e3GB'"
            )
        value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{name} must be a positive, finite number of bytes, got {original!r}")
    return int(value)
