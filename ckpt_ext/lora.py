"""LoRA on the fused block's linears: the low-rank update stays low-rank in forward, backward and recompute.

A linear ``t`` of the block (``LORA_TARGETS``: the packed q|k|v or q, k, v; proj; fc or gate, up; fc2) computes
    z = drop(y) Aᵀ                 (N, r)       y (N, in) the linear's input, A (r, in), B (out, r)
    out = y Wᵀ + b + s · z Bᵀ       (N, out)     s = lora_alpha / r (rsLoRA: lora_alpha / √r)
(PEFT's ``lora.Linear``). ``drop`` is the project's hash dropout (ops/dropout.py) with seed ``cfg.seed + 3 + i``
(i = the target's index in LORA_TARGETS), so backward replays the forward's mask and nothing is stored for it.
Backward from dZ = d out (N, out), never a d×d matrix for the frozen W:
    g  = s · dZ B                  (N, r)
    dy += drop(g A)                (N, in)      dropout is its own adjoint
    dA = gᵀ drop(y)                (r, in)
    dB = s · dZᵀ z                 (out, r)     z recomputed from y (an N·in·r GEMM): no policy keeps it
A residual-branch linear (proj, fc2) with residual dropout p: x + drop_p(aWᵀ + b + Δ) = (x + drop_p(Δ)) + drop_p(aWᵀ
+ b) under one mask (dropout is linear), so the fused ``linear_dropout_add`` epilogue still runs and Δ reaches it
through the residual. What each policy keeps is unchanged (policies.py): y is the norm output (rebuilt in the norm's
backward), attn_out (kept or replayed), or the activation (rebuilt by the MLP's backward), and z is recomputed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

LORA_TARGETS = ("qkv", "q", "k", "v", "proj", "fc", "gate", "up", "fc2")
MLP_TARGETS = ("fc", "gate", "up", "fc2")


@dataclass(frozen=True)
class LoraSpec:
    """One adapted linear: ``target`` in LORA_TARGETS, ``rank`` r, ``scaling`` s, input ``dropout`` p."""

    target: str
    rank: int
    scaling: float
    dropout: float = 0.0

    def __post_init__(self):
        if self.target not in LORA_TARGETS:
            raise ValueError(f"LoraSpec target must be one of {LORA_TARGETS}, got {self.target!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) or self.rank <= 0:
            raise ValueError(f"LoraSpec rank must be a positive int, got {self.rank!r}")
        if not isinstance(self.scaling, numbers.Real) or not math.isfinite(self.scaling):
            raise ValueError(f"LoraSpec scaling must be a finite number, got {self.scaling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "scaling", float(self.scaling))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def a_name(self) -> str:
        return f"lora_a_{self.target}"

    @property
    def b_name(self) -> str:
        return f"lora_b_{self.target}"

    def seed(self, block_seed) -> int:
        return block_seed + 3 + LORA_TARGETS.index(self.target)


def param_names(specs: tuple[LoraSpec, ...]) -> tuple[str, ...]:
    """The A and B tensor names of ``specs`` in LORA_TARGETS order (appended to the block's parameter names)."""
    ordered = sorted(specs, key=lambda s: LORA_TARGETS.index(s.target))
    return tuple(n for s in ordered for n in (s.a_name, s.b_name))


def check_specs(specs, packed_qkv: bool, mlp: str) -> None:
    """Each target at most once and one the block has (packed q|k|v or q, k, v; fc or gate/up)."""
    if not isinstance(specs, tuple) or not all(isinstance(s, LoraSpec) for s in specs):
        raise TypeError(f"BlockConfig.lora must be a tuple of LoraSpec, got {specs!r}")
    targets = [s.target for s in specs]
    if len(set(targets)) != len(targets):
        raise ValueError(f"BlockConfig.lora names a target twice: {targets}")
    have = {"proj", "fc2", *(("qkv",) if packed_qkv else ("q", "k", "v")),
            *(("fc",) if mlp == "gelu" else ("gate", "up"))}  # fmt: skip
    wrong = [t for t in targets if t not in have]
    if wrong:
        raise ValueError(f"LoRA targets {wrong} do not exist in this block (it has {sorted(have)})")


def check_tensors(spec: LoraSpec, a, b, in_features: int, out_features: int) -> None:
    """A must be (r, in) and B (out, r)."""
    if a is None or b is None:
        raise ValueError(f"LoRA on {spec.target!r}: missing {spec.a_name if a is None else spec.b_name}")
    if tuple(a.shape) != (spec.rank, in_features):
        raise ValueError(f"{spec.a_name} must be (rank, in) = ({spec.rank}, {in_features}), got {tuple(a.shape)}")
    if tuple(b.shape) != (out_features, spec.rank):
        raise ValueError(f"{spec.b_name} must be (out, rank) = ({out_features}, {spec.rank}), got {tuple(b.shape)}")


# ------------------------------------------------------------------------------------- reading PEFT LoRA layers
# A PEFT ``lora.Linear`` (duck-typed: ``base_layer``, ``lora_A`` / ``lora_B`` ModuleDicts, ``scaling``,
# ``lora_dropout``; peft is never imported) computes base(x) + lora_B(lora_A(dropout(x))) · scaling per active adapter.
# ``read_linear(module, target)`` gives the base linear and at most one (LoraSpec, A, B), or raises Unsupported for
# what the block would not compute exactly: DoRA and other variants, several active adapters on one layer, a bias on
# the LoRA matrices, a dropout other than nn.Dropout / nn.Identity, adapters disabled while merged. The dropout's p
# counts only in training mode, as nn.Dropout's does.


class Unsupported(Exception):
    """This linear's LoRA form is not one the fused block computes; the message says why."""


class LinearRead(NamedTuple):
    base: nn.Module  # the plain linear (nn.Linear or GPT-2's Conv1D) whose weight and bias the block reads
    spec: Optional[LoraSpec]
    a: Optional[Tensor]  # (r, in)
    b: Optional[Tensor]  # (out, r)


def is_lora_layer(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in ("base_layer", "lora_A", "lora_B", "scaling", "lora_dropout"))


def read_linear(module: nn.Module, target: str) -> LinearRead:
    """The base linear and its active LoRA adapter (if any) of ``module``, a plain linear or a PEFT LoRA layer."""
    if not is_lora_layer(module):
        return LinearRead(module, None, None, None)
    base = module.base_layer
    if is_lora_layer(base):
        raise Unsupported("nested LoRA layers")
    merged = bool(getattr(module, "merged", False))
    if getattr(module, "disable_adapters", False):
        if merged:
            raise Unsupported("adapters disabled while merged (PEFT unmerges the base weight in its forward)")
        return LinearRead(base, None, None, None)
    if merged:
        return LinearRead(base, None, None, None)  # the update is in the base weight
    active = [name for name in module.active_adapters if name in module.lora_A.keys()]
    if not active:
        return LinearRead(base, None, None, None)
    if len(active) > 1:
        raise Unsupported(f"{len(active)} active adapters on one layer ({', '.join(active)})")
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        raise Unsupported(f"adapter {name!r} is a LoRA variant (DoRA or other), not plain LoRA")
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if not (type(lora_a) is nn.Linear and type(lora_b) is nn.Linear):
        raise Unsupported(f"adapter {name!r}: lora_A / lora_B are not plain nn.Linear")
    if lora_a.bias is not None or lora_b.bias is not None:
        raise Unsupported(f"adapter {name!r} has a bias on its LoRA matrices (lora_bias=True)")
    if lora_a._forward_hooks or lora_a._forward_pre_hooks or lora_b._forward_hooks or lora_b._forward_pre_hooks:
        raise Unsupported(f"adapter {name!r}: hooks on lora_A / lora_B")
    dropout = module.lora_dropout[name]
    if type(dropout) is nn.Identity:
        p = 0.0
    elif type(dropout) is nn.Dropout:
        p = float(dropout.p) if dropout.training else 0.0
    else:
        raise Unsupported(f"adapter {name!r}: lora_dropout is {type(dropout).__name__}, not nn.Dropout")
    a, b = lora_a.weight, lora_b.weight
    spec = LoraSpec(target, int(a.shape[0]), float(module.scaling[name]), p)
    return LinearRead(base, spec, a, b)


class Linears(NamedTuple):
    """A layer's linears as the fused block reads them: the base module per target, the active adapters' A and B
    by block parameter name (``lora_a_<target>``, ``lora_b_<target>``), their specs, and the linears' paths."""

    base: dict
    lora_params: dict
    specs: tuple
    paths: frozenset


def read_linears(linears: dict) -> Linears:
    """``linears``: target -> (path, module), each a plain linear or a PEFT LoRA layer; raises Unsupported, naming
    the path, for a LoRA form the fused block does not compute (read_linear)."""
    base, tensors, specs = {}, {}, []
    for target, (path, module) in linears.items():
        try:
            read = read_linear(module, target)
        except Unsupported as err:
            raise Unsupported(f"{path}: {err}") from None
        base[target] = read.base
        if read.spec is not None:
            tensors[read.spec.a_name], tensors[read.spec.b_name] = read.a, read.b
            specs.append(read.spec)
    return Linears(base, tensors, tuple(specs), frozenset(path for path, _ in linears.values()))


# PEFT target_modules naming every linear of ckpt_ext's TransformerBlock per family, and of a HF Llama-family layer
BLOCK_LORA_TARGETS = {"gpt2": ["qkv", "attn.proj", "fc", "mlp.proj"],
                      "llama": ["attn.q", "attn.k", "attn.v", "attn.proj", "gate", "up", "mlp.proj"]}  # fmt: skip
HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_peft_lora(module: nn.Module, rank: int, targets: list[str], *, alpha: Optional[float] = None,
                  dropout: float = 0.0, freeze_base: bool = True, b_std: float = 0.02) -> nn.Module:  # fmt: skip
    """``module`` with PEFT LoRA adapters (rank, lora_alpha = ``alpha`` or 2·rank) on the linears whose names end in
    ``targets``, the base weights frozen, B drawn from N(0, b_std) (PEFT starts it at zero, which would make A's
    gradient zero): what the benchmarks and the roofline model adapt. Needs peft."""
    import peft

    holder = nn.Module()  # PEFT reads ``model.config``; ckpt_ext's TransformerBlock.config is a method
    holder.inner = module
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=dropout,
                          target_modules=targets)  # fmt: skip
    module = peft.inject_adapter_in_model(cfg, holder).inner
    for name, p in module.named_parameters():
        if freeze_base:
            p.requires_grad_("lora_" in name)
        if "lora_B" in name and b_std:
            with torch.no_grad():
                p.normal_(0.0, b_std)
    return module
