"""The microbenchmark cases: every op of the block's ``ckpt_ext::*`` graph next to its torch eager equivalent.

A Case holds one op call (``ours``) and the eager torch code that does the same job (``eager``); when ``eager`` is a
pure function of tensors it can also run under torch.compile. Forward ops are compared with torch's forward ops,
backward ops with the backward torch runs for the same math (autograd.grad on a retained graph, or the aten backward
op autograd itself would call). Dropout's eager side draws torch's RNG mask (same work, different mask).

Shapes: N = B·T rows, d = width, H = hidden (FFN), h = heads; float32 on CPU by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten

import ckpt_ext  # noqa: F401  (registers torch.ops.ckpt_ext.*)
from ckpt_ext.measure import count_flops

ops = torch.ops.ckpt_ext
EPS = 1e-5
DROPOUT_P = 0.1


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    d_model: int
    n_heads: int
    hidden: int

    @property
    def rows(self) -> int:
        return self.batch * self.seq

    def __str__(self) -> str:
        return f"B{self.batch}xT{self.seq}xd{self.d_model}xh{self.n_heads}xH{self.hidden}"


@dataclass
class Case:
    """One op: ``ours`` / ``eager`` are (function, args); bytes = the op's inputs + outputs, flops = counted."""

    op: str
    family: str
    mode: str  # "fwd" | "bwd"
    ours: tuple[Callable, tuple]
    eager: tuple[Callable, tuple]
    compilable: bool
    nbytes: int = 0
    flops: int = 0


def _nbytes(tree) -> int:
    return sum(t.untyped_storage().nbytes() for t in tree_flatten(tree)[0] if isinstance(t, Tensor) and t.numel())


def _measure_work(case: Case) -> Case:
    fn, args = case.ours
    out = fn(*args)
    case.nbytes = _nbytes(args) + _nbytes(out)
    case.flops = count_flops(fn, *args)
    return case


def _eager_ln_bwd(x: Tensor, w: Tensor, b: Tensor, dy: Tensor) -> Callable[[], tuple]:
    """autograd.grad of F.layer_norm on a graph built once and retained (backward only is timed)."""
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = F.layer_norm(x, (x.shape[-1],), w, b, EPS)
    return lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)


def _sdpa(qkv: Tensor, n_heads: int) -> Tensor:
    b, t, three_d = qkv.shape
    q, k, v = qkv.view(b, t, 3, n_heads, three_d // 3 // n_heads).unbind(2)  # 3 x (B, T, h, dh)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2).reshape(b, t, three_d // 3)  # (B, T, d)


def _eager_attention_bwd(qkv: Tensor, n_heads: int, dout: Tensor) -> Callable[[], tuple]:
    qkv = qkv.detach().requires_grad_()
    out = _sdpa(qkv, n_heads)
    return lambda: torch.autograd.grad(out, (qkv,), dout, retain_graph=True)


def _ffn_recompute_eager(x1, ln_w, ln_b, w1, b1, dy, w2):
    u = F.linear(F.layer_norm(x1, (x1.shape[-1],), ln_w, ln_b, EPS), w1, b1)  # (N, H)
    du = torch.ops.aten.gelu_backward(dy @ w2, u)  # (N, H)
    return F.gelu(u), du, du.sum(0)


def _linear_bias_gelu_eager(x, w, b):
    return F.gelu(F.linear(x, w, b))  # (N, H)


def _linear_gelu_bwd_eager(dy, w2, u):
    return torch.ops.aten.gelu_backward(dy @ w2, u)  # (N, H)


def _gelu_linear_wgrad_eager(dy, u):
    return dy.t() @ F.gelu(u)  # (d, H)


def _bias_gelu_eager(u, b1):
    return F.gelu(u + b1)


def _dropout_add_eager(x, res):
    return F.dropout(x, DROPOUT_P, training=True) + res


def _dropout_bwd_eager(grad, mask):
    return torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - DROPOUT_P))


def build_cases(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[Case]:
    """All cases at one shape, inputs drawn from ``seed``; bytes and FLOPs counted from one call of each op."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, d, hid, h = shape.rows, shape.d_model, shape.hidden, shape.n_heads

    def rnd(*size: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    x, dy_d = rnd(n, d), rnd(n, d)  # (N, d)
    ln_w, ln_b = 1.0 + rnd(d, scale=0.1), rnd(d, scale=0.1)  # (d,)
    w1, b1 = rnd(hid, d, scale=d**-0.5), rnd(hid, scale=0.1)  # (H, d), (H,)
    w2 = rnd(d, hid, scale=hid**-0.5)  # (d, H)
    u, da = rnd(n, hid), rnd(n, hid)  # (N, H)
    qkv = rnd(shape.batch, shape.seq, 3 * d)  # (B, T, 3d)
    dout = rnd(shape.batch, shape.seq, d)  # (B, T, d)
    _, mean, rstd = ops.layer_norm_fwd(x, ln_w, ln_b, EPS)  # (N,) fp32 each
    attn_out, lse = ops.attention_fwd(qkv, h, True, 0.0, 0, None)  # (B, T, d), (B, h, T)
    drop_mask = torch.rand(n, d, generator=gen).to(device) >= DROPOUT_P  # (N, d) bool

    cases = [
        Case("layer_norm_fwd", "layer_norm", "fwd", (ops.layer_norm_fwd, (x, ln_w, ln_b, EPS)),
             (F.layer_norm, (x, (d,), ln_w, ln_b, EPS)), True),
        Case("layer_norm_bwd", "layer_norm", "bwd",
             (ops.layer_norm_bwd, (dy_d, x, mean, rstd, ln_w, ln_b, None, False)),
             (_eager_ln_bwd(x, ln_w, ln_b, dy_d), ()), False),
        Case("bias_gelu", "gelu", "fwd", (ops.bias_gelu, (u, b1, "none")), (_bias_gelu_eager, (u, b1)), True),
        Case("gelu_bwd", "gelu", "bwd", (ops.gelu_bwd, (da, u, "none")),
             (torch.ops.aten.gelu_backward, (da, u)), True),
        Case("dropout_add", "dropout_add", "fwd", (ops.dropout_add, (x, dy_d, DROPOUT_P, 1234)),
             (_dropout_add_eager, (x, dy_d)), True),
        Case("dropout_add", "dropout_add", "bwd", (ops.dropout_add, (dy_d, None, DROPOUT_P, 1234)),
             (_dropout_bwd_eager, (dy_d, drop_mask)), True),
        Case("ffn_recompute", "ffn", "bwd",
             (ops.ffn_recompute, (x, mean, rstd, ln_w, ln_b, w1, b1, dy_d, w2, "none")),
             (_ffn_recompute_eager, (x, ln_w, ln_b, w1, b1, dy_d, w2)), True),
        Case("linear_bias_gelu", "ffn", "fwd", (ops.linear_bias_gelu, (x, w1, b1, "none")),
             (_linear_bias_gelu_eager, (x, w1, b1)), True),
        Case("linear_gelu_bwd", "ffn", "bwd", (ops.linear_gelu_bwd, (dy_d, w2, u, "none")),
             (_linear_gelu_bwd_eager, (dy_d, w2, u)), True),
        Case("gelu_linear_wgrad", "ffn", "bwd", (ops.gelu_linear_wgrad, (dy_d, u, "none")),
             (_gelu_linear_wgrad_eager, (dy_d, u)), True),
        Case("attention_fwd", "attention", "fwd", (ops.attention_fwd, (qkv, h, True, 0.0, 0, None)),
             (_sdpa, (qkv, h)), True),
        Case("attention_bwd", "attention", "bwd",
             (ops.attention_bwd, (dout, qkv, attn_out, lse, h, True, 0.0, 0, None)),
             (_eager_attention_bwd(qkv, h, dout), ()), False),
    ]  # fmt: skip
    return [_measure_work(c) for c in cases]


def select(cases: list[Case], names: list[str]) -> list[Case]:
    """Cases whose op or family is in ``names`` (all when empty)."""
    if not names:
        return cases
    return [c for c in cases if c.op in names or c.family in names]


def known_names() -> list[str]:
    ops_ = ["layer_norm_fwd", "layer_norm_bwd", "bias_gelu", "gelu_bwd", "dropout_add", "ffn_recompute",
            "linear_bias_gelu", "linear_gelu_bwd", "gelu_linear_wgrad", "attention_fwd", "attention_bwd"]  # fmt: skip
    return ops_ + ["layer_norm", "gelu", "ffn", "attention"]
