"""``TransformerBlock`` (plain pre-LN block, torch modules) and ``FusedCheckpointBlock`` (same parameters, fused
checkpointing through the ``ckpt_ext::*`` op graph).

For x (B, T, d):  q|k|v = attn.qkv(ln_1(x)), heads contiguous;  x1 = x + Dropout(attn.proj(SDPA(q, k, v)))
                  out = x1 + Dropout(mlp.proj(act(mlp.fc(ln_2(x1)))));  hidden = int(mlp_ratio * d_model)
Parameter names (ln_1, attn.qkv, attn.proj, ln_2, mlp.fc, mlp.proj) are the same in both classes, so state_dicts load
both ways and ``FusedCheckpointBlock.from_block`` shares a block's parameters without copying them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import PARAM_NAMES, BlockConfig, FusedBlockFunction, block_forward
from .policies import get_policy

ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, bias: bool):
        super().__init__()
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)


class TransformerBlock(nn.Module):
    """Plain pre-LN transformer block (no checkpointing): the baseline FusedCheckpointBlock reproduces."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        activation: str = "gelu",
        causal: bool = True,
        eps: float = 1e-5,
        bias: bool = True,
    ):
        super().__init__()
        if d_model <= 0 or n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be positive and divide d_model ({d_model})")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        for name, p in (("dropout", dropout), ("attn_dropout", attn_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self.d_model, self.n_heads, self.hidden = d_model, n_heads, int(mlp_ratio * d_model)
        self.mlp_ratio, self.dropout, self.attn_dropout = mlp_ratio, dropout, attn_dropout
        self.activation, self.causal, self.eps, self.bias = activation, causal, eps, bias
        self.ln_1 = nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.attn = Attention(d_model, n_heads, bias)
        self.ln_2 = nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.mlp = MLP(d_model, self.hidden, bias)
        self.resid_drop = nn.Dropout(dropout)

    def config(self) -> dict:
        return dict(
            d_model=self.d_model, n_heads=self.n_heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout,
            attn_dropout=self.attn_dropout, activation=self.activation, causal=self.causal, eps=self.eps,
            bias=self.bias,
        )  # fmt: skip

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected x of shape (batch, seq, {self.d_model}), got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point x, got {x.dtype}")

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        self._check_input(x)
        b, t, d = x.shape
        qkv = self.attn.qkv(self.ln_1(x))
        q, k, v = qkv.view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        if attn_mask is not None and self.causal:
            attn_mask = _with_causal(attn_mask, t)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0, is_causal=self.causal and attn_mask is None,
        )  # fmt: skip
        x1 = x + self.resid_drop(self.attn.proj(o.transpose(1, 2).reshape(b, t, d)))
        h = F.gelu(self.mlp.fc(self.ln_2(x1)), approximate=ACTIVATIONS[self.activation])
        return x1 + self.resid_drop(self.mlp.proj(h))


def _with_causal(attn_mask: Tensor, t: int) -> Tensor:
    """Fold a causal mask into a user mask (bool keep-mask or additive float) for SDPA, which takes one or the other."""
    causal = torch.ones(t, t, dtype=torch.bool, device=attn_mask.device).tril()
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))


class FusedCheckpointBlock(TransformerBlock):
    """Drop-in TransformerBlock whose backward rebuilds what ``policy`` did not keep, inside fused kernels.

    policy: "none" | "pointwise" | "ffn" | "block" (see ckpt_ext.policies). Dropout masks come from per-call seeds
    drawn from torch's RNG, so recompute replays them exactly; all policies draw the same masks under one seed.
    """

    def __init__(self, d_model: int, n_heads: int, *, policy: str = "block", **kwargs):
        super().__init__(d_model, n_heads, **kwargs)
        self.policy = get_policy(policy).name

    @classmethod
    def from_block(cls, block: TransformerBlock, policy: str = "block") -> FusedCheckpointBlock:
        """A FusedCheckpointBlock that shares (does not copy) ``block``'s submodules and parameters."""
        if not isinstance(block, TransformerBlock):
            raise TypeError(f"from_block expects a ckpt_ext.TransformerBlock, got {type(block).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for key in ("d_model", "n_heads", "hidden", "mlp_ratio", "dropout", "attn_dropout", "activation", "causal",
                    "eps", "bias"):  # fmt: skip
            setattr(new, key, getattr(block, key))
        for name in ("ln_1", "attn", "ln_2", "mlp", "resid_drop"):
            setattr(new, name, getattr(block, name))
        new.policy = get_policy(policy).name
        new.train(block.training)
        return new

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}"

    def parameter_tensors(self) -> tuple[Optional[Tensor], ...]:
        """The block's tensors in functional.PARAM_NAMES order (None where bias=False)."""
        return (
            self.ln_1.weight, self.ln_1.bias, self.attn.qkv.weight, self.attn.qkv.bias,
            self.attn.proj.weight, self.attn.proj.bias, self.ln_2.weight, self.ln_2.bias,
            self.mlp.fc.weight, self.mlp.fc.bias, self.mlp.proj.weight, self.mlp.proj.bias,
        )  # fmt: skip

    def block_config(self) -> BlockConfig:
        p_attn = self.attn_dropout if self.training else 0.0
        p = self.dropout if self.training else 0.0
        seed = int(torch.randint(0, 2**31 - 8, (1,)).item()) if (p > 0.0 or p_attn > 0.0) else 0
        return BlockConfig(self.n_heads, self.causal, self.eps, ACTIVATIONS[self.activation], p_attn, p, seed,
                           self.policy)  # fmt: skip

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        self._check_input(x)
        return fused_block(x, self.parameter_tensors(), self.block_config(), attn_mask)


def fused_block(x: Tensor, params, cfg: BlockConfig, attn_mask: Optional[Tensor] = None) -> Tensor:
    """Run the block through the op graph; params in PARAM_NAMES order (strided views such as Wᵀ are fine).

    Under no_grad, or when nothing needs a gradient, no Function is built and nothing is kept.
    """
    if len(params) != len(PARAM_NAMES):
        raise ValueError(f"expected {len(PARAM_NAMES)} parameter tensors ({', '.join(PARAM_NAMES)})")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))
    if not needs_grad:
        b, t, d = x.shape
        out, _ = block_forward(x.reshape(b * t, d), (b, t), dict(zip(PARAM_NAMES, params)), cfg, attn_mask)
        return out.view(b, t, d)
    return FusedBlockFunction.apply(x, attn_mask, cfg, *params)


def init_block_(block: TransformerBlock, std: float = 0.02, n_layers: int = 1) -> None:
    """GPT-2 style init: normal(0, std) weights, zero biases, residual projections scaled by 1/sqrt(2 n_layers)."""
    for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
        nn.init.normal_(lin.weight, std=std)
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
    for lin in (block.attn.proj, block.mlp.proj):
        lin.weight.data.mul_(1.0 / math.sqrt(2 * n_layers))
