"""Attention through aten's fused kernels where they fit, materialized math with the C++ dropout kernel on CPU.

Our dropout uses a reproducible hash mask that aten's kernels cannot draw, so the fused kernels run only when
dropout_p == 0 and there is no attn_mask. Otherwise, on CPU, ``cpu_math`` runs reference.attention_*'s math with aten
ops (S = q kᵀ/√dh + mask/causal bias (B, h, T, T) from reference._scores' one baddbmm, P by one fused softmax, P
rebuilt from lse in backward, aten's softmax backward) and applies the probability dropout with the C++ kernel
``dropout_add_kernel`` over the flat contiguous (B, h, T, T) index: the reference's mask, bit for bit, without building
it from int64 tensor ops (that hash was most of the reference path's time). On CUDA without a fitting flash kernel the
reference math runs. Same inputs, outputs and layouts as the ops in attention.py:
qkv (B, T, 3d) -> out (B, T, d), lse (B, h, T) fp32.
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
    if qkv.shape[1] == 0:
        return "reference"
    if dropout_p != 0.0 or attn_mask is not None:
        cpp_dropout = hasattr(torch.ops.ckpt_ext, "dropout_add_kernel")
        return "cpu_math" if qkv.device.type == "cpu" and cpp_dropout else "reference"
    if qkv.device.type == "cpu":
        return "cpu_flash"
    if qkv.device.type == "cuda" and _cuda_flash_fits(qkv, n_heads):
        return "cuda_flash"
    return "reference"


def attention_fwd(qkv, n_heads, causal, dropout_p, seed, attn_mask):
    route = _route(qkv, n_heads, dropout_p, attn_mask)
    if route == "reference":
        return reference.attention_fwd(qkv, n_heads, causal, dropout_p, seed, attn_mask)
    if route == "cpu_math":
        return _math_fwd(qkv, n_heads, causal, dropout_p, seed, attn_mask)
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
    if route == "cpu_math":
        return _math_bwd(dout, qkv, lse, n_heads, causal, dropout_p, seed, attn_mask)
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
    return _pack_dqkv(qkv, n_heads, dq, dk, dv)


def _pack_dqkv(qkv, n_heads, dq, dk, dv):
    """dq, dk, dv (B, h, T, dh) -> dqkv (B, T, 3d) in qkv.dtype, each grad copied into its third in one pass."""
    b, t, three_d = qkv.shape
    dqkv = qkv.new_empty((b, t, 3, n_heads, three_d // 3 // n_heads))
    for i, grad in enumerate((dq, dk, dv)):
        dqkv[:, :, i].copy_(grad.transpose(1, 2))
    return dqkv.view(b, t, three_d)


def _probs(qkv, n_heads, causal, attn_mask, lse=None):
    """q, k, v (B, h, T, dh) in the compute dtype, P = softmax(S) (B, h, T, T) contiguous, lse (B, h, T).

    Forward: P by one fused softmax and lse = max S - log max P (max P = 1 / Σ exp(S - max S)), instead of logsumexp
    and a second exp pass; backward (lse given): P = exp(S - lse), the reference's formula."""
    cdt = reference.compute_dtype(qkv)
    q, k, v = (x.to(cdt) for x in reference._split_heads(qkv, n_heads))
    s = reference._scores(q, k, causal, attn_mask)
    if lse is not None:
        return q, k, v, s.sub_(lse.to(cdt).unsqueeze(-1)).exp_(), lse  # in place over the scores
    s_max = s.amax(dim=-1)
    p = torch.softmax(s, dim=-1)
    lse = torch.where(torch.isneginf(s_max), s_max, s_max - p.amax(dim=-1).log())  # fully masked rows: -inf
    return q, k, v, p, lse


def _drop(x, dropout_p, seed):
    """x * keep / (1 - p) with the hash mask over x's flat contiguous index (the C++ kernel; x itself when p = 0)."""
    return torch.ops.ckpt_ext.dropout_add_kernel(x, None, dropout_p, seed) if dropout_p > 0.0 else x


def _math_fwd(qkv, n_heads, causal, dropout_p, seed, attn_mask):
    b, t, three_d = qkv.shape
    _, _, v, p, lse = _probs(qkv, n_heads, causal, attn_mask)
    out = (_drop(p, dropout_p, seed) @ v).transpose(1, 2).reshape(b, t, three_d // 3)
    return out.to(qkv.dtype), lse


def _math_bwd(dout, qkv, lse, n_heads, causal, dropout_p, seed, attn_mask):
    b, t, three_d = qkv.shape
    q, k, v, p, _ = _probs(qkv, n_heads, causal, attn_mask, lse)
    do = dout.to(p.dtype).view(b, t, n_heads, -1).transpose(1, 2)  # (B, h, T, dh)
    dv = _drop(p, dropout_p, seed).transpose(-1, -2) @ do
    dp = _drop(do @ v.transpose(-1, -2), dropout_p, seed)  # the same mask: dropout is its own adjoint
    ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # p (dp - rowsum(p dp))
    if attn_mask is not None:
        ds = torch.nan_to_num(ds)  # rows the mask empties entirely
    sm = q.shape[-1] ** -0.5
    return _pack_dqkv(qkv, n_heads, (ds @ k) * sm, (ds.transpose(-1, -2) @ q) * sm, dv)
