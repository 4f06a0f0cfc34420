"""``BlockSpec``: what one transformer block *is* — the single value every runtime, table and adapter reads.

A block is three kinds of segment (block_parts/): two norms, the attention half and the MLP half. The spec says, for
each, which form it takes; nothing else in the package hard-codes a family:

    norm       "layernorm" | "rmsnorm"; ``norm_bias`` (LayerNorm β present), ``norm_offset`` (weight used as
               offset + γ, Gemma's 1 + γ), ``eps``; ``placement`` "pre" (x + f(norm(x))) or "post"
               (norm(x + f(x)), BERT); ``attn_norm`` False: pre-LN without norm1 (ModernBERT's first layer)
    attention  ``n_heads``, ``n_kv_heads`` (GQA; 0 = n_heads), ``head_dim`` (0 = d / n_heads), ``causal``, softmax
               ``scale`` (0 = head_dim^-1/2), ``qk_norm`` (Qwen3's per-head RMSNorm on q, k), ``packed_qkv`` (one
               q|k|v weight or three), ``window`` (0 = none; w > 0: query i sees key j only if |i - j| <= w,
               ModernBERT's local layers); RoPE is per call (the model's cos, sin tables)
    mlp        "gelu" | "gelu_tanh" (fc → act → proj) or the gated "swiglu" (silu(gate)·up) | "geglu"
               (gelu_tanh(gate)·up, Gemma) | "geglu_erf" (erf gelu(gate)·up, ModernBERT's default), then the down
               projection
    linears    plain, or PEFT LoRA (``lora``: one lora.LoraSpec per adapted linear)

``BlockConfig`` = a spec + what changes from call to call: the recompute policy, the dropout probabilities and the
dropout seed. ``spec.param_names()`` is the block's parameter list (names, in one fixed order), so a new form adds its
own names instead of another fixed slot. Numbers are normalized to Python numbers at construction (numpy scalars
included; the compiled block round-trips a config through text).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

from . import lora
from .policies import get_policy

NORMS = ("layernorm", "rmsnorm")
PLACEMENTS = ("pre", "post")
MLPS = ("gelu", "gelu_tanh", "swiglu", "geglu", "geglu_erf")
GATE_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu_tanh", "geglu_erf": "gelu"}  # gated MLP kind -> its gate's act
GELU_FORM = {"gelu": "none", "gelu_tanh": "tanh"}  # GELU MLP kind -> the ops' ``approximate`` argument

# Every parameter name a spec may use, in the one order the block passes them (a spec uses a subset).
ALL_PARAM_NAMES = (
    "ln1_w", "ln1_b", "w_qkv", "b_qkv", "w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "q_norm_w", "k_norm_w",
    "w_proj", "b_proj", "ln2_w", "ln2_b", "w_fc", "b_fc", "w_gate", "b_gate", "w_up", "b_up", "w_fc2", "b_fc2",
)  # fmt: skip


@dataclass(frozen=True)
class BlockSpec:
    n_heads: int
    causal: bool = False
    eps: float = 1e-5
    norm: str = "layernorm"
    norm_bias: bool = True
    norm_offset: float = 0.0
    placement: str = "pre"
    attn_norm: bool = True  # pre-LN: False = no norm in front of attention (ModernBERT's first layer)
    mlp: str = "gelu"
    n_kv_heads: int = 0
    head_dim: int = 0
    qk_norm: bool = False
    packed_qkv: bool = True
    scale: float = 0.0
    window: int = 0  # sliding window: query i sees key j only if |i - j| <= window (0 = every key)
    lora: tuple = ()

    def __post_init__(self):
        for f in fields(self):
            kind = _NUMBER_KINDS.get(f.name)
            value = getattr(self, f.name)
            if kind is not None and type(value) is not kind:
                object.__setattr__(self, f.name, python_number(f"BlockSpec.{f.name}", kind, value))

    # ---- attention shape
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def dh(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def softmax_scale(self, d_model: int) -> float:
        return self.scale or self.dh(d_model) ** -0.5

    # ---- MLP kind
    @property
    def gated(self) -> bool:
        return self.mlp in GATE_ACTIVATIONS

    @property
    def approximate(self) -> str:
        """The GELU form of a GELU MLP or GeGLU gate ("none" erf, "tanh")."""
        return GELU_FORM.get(self.mlp, "tanh" if self.mlp == "geglu" else "none")

    def n_stats(self) -> int:
        """fp32 statistics per row a norm keeps: LayerNorm mean and rstd, RMSNorm rstd."""
        return 2 if self.norm == "layernorm" else 1

    def first_linears(self) -> tuple[str, ...]:
        """The MLP's first linear(s), by target name (lora.py): (fc,) or (gate, up)."""
        return ("gate", "up") if self.gated else ("fc",)

    def param_names(self) -> tuple[str, ...]:
        """The parameters this spec uses, in ALL_PARAM_NAMES order, then its LoRA A and B."""
        names = _param_names(self.norm, self.norm_bias, self.packed_qkv, self.qk_norm, self.gated)
        if not self.attn_norm:
            names = tuple(n for n in names if not n.startswith("ln1_"))
        return names + lora.param_names(self.lora)

    def check(self) -> None:
        """A clear error naming the field for a spec no runtime can run."""
        for name, allowed in (("norm", NORMS), ("placement", PLACEMENTS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"BlockSpec.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.n_heads <= 0 or self.kv_heads() <= 0 or self.n_heads % self.kv_heads() != 0:
            raise ValueError(f"n_kv_heads ({self.kv_heads()}) must be positive and divide n_heads ({self.n_heads})")
        if self.eps <= 0.0:
            raise ValueError(f"BlockSpec.eps must be positive, got {self.eps}")
        if self.window < 0:
            raise ValueError(f"BlockSpec.window must be >= 0 (0 = no window), got {self.window}")
        if self.placement == "post" and not self.attn_norm:
            raise ValueError("BlockSpec.attn_norm=False needs placement='pre' (post-LN's norm1 follows attention)")
        if self.placement == "post" and self.qk_norm:
            raise ValueError("BlockSpec: qk_norm with placement='post' is not a form any supported model uses")
        lora.check_specs(self.lora, self.packed_qkv, "swiglu" if self.gated else "gelu")


_NUMBER_KINDS = {"n_heads": int, "causal": bool, "eps": float, "norm_bias": bool, "norm_offset": float,
                 "attn_norm": bool, "n_kv_heads": int, "head_dim": int, "qk_norm": bool, "packed_qkv": bool,
                 "scale": float, "window": int}  # fmt: skip


def _param_names(norm: str, norm_bias: bool, packed_qkv: bool, qk_norm: bool, gated: bool) -> tuple[str, ...]:
    names = {"ln1_w", "ln2_w", "w_proj", "b_proj", "w_fc2", "b_fc2"}
    names |= {"ln1_b", "ln2_b"} if norm == "layernorm" and norm_bias else set()
    names |= {"w_qkv", "b_qkv"} if packed_qkv else {"w_q", "b_q", "w_k", "b_k", "w_v", "b_v"}
    names |= {"q_norm_w", "k_norm_w"} if qk_norm else set()
    names |= {"w_gate", "b_gate", "w_up", "b_up"} if gated else {"w_fc", "b_fc"}
    return tuple(n for n in ALL_PARAM_NAMES if n in names)


@dataclass(frozen=True)
class BlockConfig:
    """One call of the fused block: its spec, the recompute policy and the dropout of this call.

    seed: base seed of this call's dropout masks (attention +0, residual 1 +1, residual 2 +2, LoRA +3 + i).
    ln2_from_out: chosen per call by ``block.fused_block`` (post-LN only): where x̂ = (out - β)/γ is exact enough
    (norm.invertible), norm2's backward reads the output the caller keeps anyway instead of the pre-norm sum h2."""

    spec: BlockSpec
    policy: str
    seed: int = 0
    attn_dropout: float = 0.0
    dropout: float = 0.0
    ln2_from_out: bool = False  # post-LN: norm2's backward rebuilds x̂ from the block's output instead of keeping h2

    def __post_init__(self):
        if not isinstance(self.spec, BlockSpec):
            raise TypeError(f"BlockConfig.spec must be a BlockSpec, got {type(self.spec).__name__}")
        for name in ("attn_dropout", "dropout"):
            value = getattr(self, name)
            if type(value) is not float:
                object.__setattr__(self, name, python_number(f"BlockConfig.{name}", float, value))
        seed = self.seed
        if type(seed) is not int and isinstance(seed, numbers.Integral):  # a numpy int; not DEVICE_SEED or a SymInt
            object.__setattr__(self, "seed", int(seed))

    def check(self) -> None:
        self.spec.check()
        get_policy(self.policy)

    def with_(self, **changes) -> BlockConfig:
        return BlockConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


def is_numpy_bool(value) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")


def python_number(what: str, kind: type, value):
    """value as ``kind`` (int, float or bool), for Python and numpy numbers; a clear error for anything else."""
    if kind is bool:
        ok = isinstance(value, numbers.Integral) and value in (0, 1) or is_numpy_bool(value)
    elif kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok:
        raise TypeError(f"{what} must be a Python {kind.__name__}, got {type(value).__name__} {value!r}")
    return kind(value)
