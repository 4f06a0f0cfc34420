"""Attention through aten's fused kernels where they fit, reference math where they do not.

aten's flash kernel for CPU has no dropout and we need our reproducible hash mask, so it runs only when
dropout_p == 0 and there is no attn_mask; otherwise the reference math (reference.attention_*) runs. Same inputs,
outputs and layouts as the ops in attention.py: qkv (B, T, 3d) -> out (B, T, d), lse (B, h, T).
"""

from __future__ import annotations

import torch

from .. import reference


def _fits(qkv, dropout_p, attn_mask) -> bool:
    return qkv.device.type == "cpu" and dropout_p == 0.0 and attn_mask is None


def attention_fwd(qkv, n_heads, causal, dropout_p, seed, attn_mask):
    if not _fits(qkv, dropout_p, attn_mask):
        return reference.attention_fwd(qkv, n_heads, causal, dropout_p, seed, attn_mask)
    b, t, three_d = qkv.shape
    q, k, v = reference._split_heads(qkv, n_heads)  # (B, h, T, dh) strided views
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return out.transpose(1, 2).reshape(b, t, three_d // 3), lse.contiguous()  # (B, T, d), (B, h, T)


def attention_bwd(dout, qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask):
    if not _fits(qkv, dropout_p, attn_mask):
        return reference.attention_bwd(dout, qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask)
    b, t, three_d = qkv.shape
    q, k, v = reference._split_heads(qkv, n_heads)
    o = out.view(b, t, n_heads, -1).transpose(1, 2)
    do = dout.view(b, t, n_heads, -1).transpose(1, 2)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, causal)
    return torch.stack([dq, dk, dv], dim=2).permute(0, 3, 2, 1, 4).reshape(b, t, three_d)
