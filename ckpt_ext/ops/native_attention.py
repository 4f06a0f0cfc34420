"""Attention through aten's fused kernels where they fit, reference math where they do not.

Our dropout uses a reproducible hash mask that aten's kernels cannot draw, so the fused kernels run only when
dropout_p == 0 and there is no attn_mask; otherwise the reference math (reference.attention_*) runs. Same inputs,
outputs and layouts as the ops in attention.py: qkv (B, T, 3d) -> out (B, T, d), lse (B, h, T) fp32.
- CPU: aten's flash kernel for CPU (any float dtype).
- CUDA: aten's FlashAttention-2 (``_scaled_dot_product_flash_attention`` and its ``_backward``) for fp16/bf16 with
  head dim a multiple of 8 and ≤ 256 on sm_80+; its logsumexp is exactly (B, h, T) fp32 in natural log. Its
  backward needs no RNG state without dropout (empty philox tensors are passed), and cum_seq_* are None (dense
  batch). fp32 on CUDA and other head dims take the reference math.
q, k, v are (B, h, T, dh) strided views of qkv (unit last stride, as both kernels require): no copies in.
"""

from __future__ import annotations

import torch

from .. import reference


def _cuda_flash_fits(qkv, n_heads: int) -> bool:
    dh = qkv.shape[2] // 3 // n_heads
    return (
        qkv.dtype in (torch.float16, torch.bfloat16)
        and dh % 8 == 0
        and dh <= 256
        and torch.cuda.get_device_capability(qkv.device)[0] >= 8
        and torch.backends.cuda.is_flash_attention_available()
    )


def _route(qkv, n_heads, dropout_p, attn_mask) -> str:
    if dropout_p != 0.0 or attn_mask is not None or qkv.shape[1] == 0:
        return "reference"
    if qkv.device.type == "cpu":
        return "cpu_flash"
    if qkv.device.type == "cuda" and _cuda_flash_fits(qkv, n_heads):
        return "cuda_flash"
    return "reference"


def attention_fwd(qkv, n_heads, causal, dropout_p, seed, attn_mask):
    route = _route(qkv, n_heads, dropout_p, attn_mask)
    if route == "reference":
        return reference.attention_fwd(qkv, n_heads, causal, dropout_p, seed, attn_mask)
    b, t, three_d = qkv.shape
    q, k, v = reference._split_heads(qkv, n_heads)  # (B, h, T, dh) strided views
    if route == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)[:2]
    return out.transpose(1, 2).reshape(b, t, three_d // 3), lse.contiguous()  # (B, T, d), (B, h, T)


def attention_bwd(dout, qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask):
    route = _route(qkv, n_heads, dropout_p, attn_mask)
    if route == "reference":
        return reference.attention_bwd(dout, qkv, out, lse, n_heads, causal, dropout_p, seed, attn_mask)
    b, t, three_d = qkv.shape
    q, k, v = reference._split_heads(qkv, n_heads)
    o = out.view(b, t, n_heads, -1).transpose(1, 2)
    do = dout.view(b, t, n_heads, -1).transpose(1, 2)
    if route == "cpu_flash":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal
        )
    else:
        rng_state = torch.empty((2,), dtype=torch.uint64, device=qkv.device)
        unused = torch.empty((), dtype=torch.uint64, device=qkv.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, o, lse.to(torch.float32), None, None, t, t, 0.0, causal, rng_state, unused
        )
    dqkv = qkv.new_empty((b, t, 3, n_heads, three_d // 3 // n_heads))  # one pass: each grad copied into its third
    for i, grad in enumerate((dq, dk, dv)):
        dqkv[:, :, i].copy_(grad.transpose(1, 2))
    return dqkv.view(b, t, three_d)
