"""``ckpt_ext::attention_fwd`` / ``ckpt_ext::attention_bwd``: softmax attention on the packed qkv projection.

attention_fwd(qkv (B, T, 3d), n_heads, causal, dropout_p, seed, attn_mask?) -> out (B, T, d) qkv.dtype,
                                                                             lse (B, h, T) fp32 (fp64 for fp64 qkv)
attention_bwd(dout (B, T, d), qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask?) -> dqkv (B, T, 3d)
q|k|v are the three thirds of qkv's last dim, head i = columns i*dh:(i+1)*dh of each. Probability dropout uses the
hash mask (reproducible from seed). attn_mask is additive (float) or keep (bool), broadcastable to (B, h, T, T).
Kernels: reference math always works; without dropout and mask, CPU runs aten's flash kernel for CPU (see cpp_bridge).
FLOPs follow torch's SDPA convention: forward 4·B·h·T²·dh, backward 10·B·h·T²·dh (causal not halved).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend


def _lse_dtype(qkv: Tensor) -> torch.dtype:
    return torch.float64 if qkv.dtype == torch.float64 else torch.float32


@torch.library.custom_op("ckpt_ext::attention_fwd", mutates_args=())
def attention_fwd(
    qkv: Tensor, n_heads: int, causal: bool, dropout_p: float, seed: int, attn_mask: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    return backend.kernel("attention_fwd", qkv.device.type)(qkv, n_heads, causal, dropout_p, seed, attn_mask)


@attention_fwd.register_fake
def _(qkv, n_heads, causal, dropout_p, seed, attn_mask):
    torch._check(qkv.dim() == 3 and qkv.shape[2] % (3 * n_heads) == 0, lambda: "attention_fwd: qkv must be (B, T, 3d)")
    b, t, three_d = qkv.shape
    return qkv.new_empty((b, t, three_d // 3)), qkv.new_empty((b, n_heads, t), dtype=_lse_dtype(qkv))


@torch.library.custom_op("ckpt_ext::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    qkv: Tensor,
    out: Tensor,
    lse: Tensor,
    n_heads: int,
    causal: bool,
    dropout_p: float,
    seed: int,
    attn_mask: Optional[Tensor],
) -> Tensor:
    return backend.kernel("attention_bwd", qkv.device.type)(
        dout, qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask
    )


@attention_bwd.register_fake
def _(dout, qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask):
    torch._check(dout.shape == out.shape, lambda: "attention_bwd: dout must match out")
    return qkv.new_empty(qkv.shape)


def _setup(ctx, inputs, output):
    qkv, n_heads, causal, dropout_p, seed, attn_mask = inputs
    out, lse = output
    ctx.args = (n_heads, causal, dropout_p, seed)
    ctx.save_for_backward(qkv, out, lse, attn_mask)


def _backward(ctx, dout, _dlse):
    qkv, out, lse, attn_mask = ctx.saved_tensors
    dqkv = attention_bwd(dout.contiguous(), qkv, out, lse, *ctx.args, attn_mask)
    return dqkv, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup)
