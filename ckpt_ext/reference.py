"""Reference math for every ``ckpt_ext::*`` op, in plain PyTorch.

This file is the definition of what each op computes. Tests compare every backend against it (in float64 where
it matters) and the ``reference`` backend runs it as the kernel of each op. All functions work in float32 (float64 when
the input is float64) and return outputs in the documented dtypes.

Shapes: N rows (= B*T), d = model width, H = FFN hidden width, h = heads, dh = d // h.

Dropout masks come from a counter-based hash, not from torch's RNG: element ``i`` of a tensor dropped with ``seed``
is kept iff ``hash32(i, seed) >> 8 >= floor(p * 2**24)``. Every backend (C++, CUDA, Triton) computes the same integer
hash, so a recomputed region reproduces the forward's mask exactly from ``seed`` alone and nothing is stored.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
GELU_TANH_COEF = 0.044715


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); every other floating dtype computes and keeps statistics in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- dropout hash
def _mul32(h: Tensor, c: int) -> Tensor:
    """(h * c) mod 2**32 for int64 h in [0, 2**32), split in 16-bit halves so that no product overflows int64."""
    lo = (h * (c & 0xFFFF)) & _M32
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def seed_key(seed: int) -> int:
    """The per-seed 32-bit key mixed into every element's hash (same formula in C++, CUDA and Triton): fmix32 of the
    seed's low 32 bits xor the golden-ratio constant, in Python ints (every launcher asks, once per op call: a tensor
    round trip here cost ~70 µs of host time per call)."""
    h = (seed ^ 0x9E3779B9) & _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    return int(p * 16777216.0)


def dropout_keep_mask(numel: int, p: float, seed: int, device=None) -> Tensor:
    """Boolean keep-mask of ``numel`` elements (flat, row-major): keep iff fmix32(fmix32(i ^ key) + key) >> 8 >= thr."""
    key = seed_key(seed)
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    h = fmix32((fmix32(idx ^ key) + key) & _M32)
    return (h >> 8) >= dropout_threshold(p)


def dropout_add(x: Tensor, residual: Optional[Tensor], p: float, seed: int) -> Tensor:
    """out = x * keep / (1 - p) (+ residual); computed in fp32, returned in result_type(x, residual).

    Its own adjoint: the gradient of x is ``dropout_add(grad, None, p, seed)``, the gradient of residual is grad.
    """
    out_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    cdt = compute_dtype(x) if out_dtype != torch.float64 else torch.float64
    y = x.to(cdt, copy=True)
    if p > 0.0:
        keep = dropout_keep_mask(x.numel(), p, seed, x.device).view(x.shape)
        y = torch.where(keep, y * (1.0 / (1.0 - p)), torch.zeros((), dtype=cdt, device=x.device))
    if residual is not None:
        y = y + residual.to(cdt)
    return y.to(out_dtype)


def linear_dropout_add(x: Tensor, w: Tensor, b: Optional[Tensor], residual: Tensor, p: float, seed: int) -> Tensor:
    """out = residual + dropout(x @ wᵀ + b): x (N, K), w (d, K), residual (N, d) -> (N, d) in residual.dtype.

    The projection's epilogue: bias, the hash dropout mask of the flat (N, d) index (same mask as
    ``dropout_add(x @ wᵀ + b, residual, p, seed)``) and the residual add, so the projection output is never written.
    x @ wᵀ + b is rounded once to x's dtype (a GEMM with a bias epilogue storing x.dtype), then dropped out in fp32.
    """
    y = torch.nn.functional.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))  # (N, d)
    return dropout_add(y, residual, p, seed).to(residual.dtype)


# -------------------------------------------------------------------------------------------------- LayerNorm
def layer_norm_fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x: (N, d) -> y (N, d) in x.dtype, mean (N,), rstd (N,) in float32 (float64 for float64 x)."""
    cdt = compute_dtype(x)
    xf = x.to(cdt)
    mean = xf.mean(dim=1)
    var = (xf - mean[:, None]).square().mean(dim=1)
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean[:, None]) * rstd[:, None] * weight.to(cdt) + bias.to(cdt)
    return y.to(x.dtype), mean, rstd


def layer_norm_apply(x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Rebuild the LayerNorm output from x and saved statistics: (N, d) in x.dtype."""
    cdt = compute_dtype(x)
    y = (x.to(cdt) - mean[:, None]) * rstd[:, None] * weight.to(cdt) + bias.to(cdt)
    return y.to(x.dtype)


def layer_norm_bwd(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    dresidual: Optional[Tensor],
    emit_y: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """VJP of LayerNorm, rebuilding x̂ = (x - mean) * rstd from the saved statistics.

    dx = rstd * (g - mean(g) - x̂ * mean(g * x̂)) with g = dy * weight, plus dresidual if given (in x.dtype).
    dweight = Σ_rows dy * x̂, dbias = Σ_rows dy (in weight.dtype). y = x̂ * weight + bias if emit_y else an empty tensor.
    """
    cdt = compute_dtype(x)
    xhat = (x.to(cdt) - mean[:, None]) * rstd[:, None]
    dyf = dy.to(cdt)
    g = dyf * weight.to(cdt)
    c1 = (g * xhat).mean(dim=1, keepdim=True)
    c2 = g.mean(dim=1, keepdim=True)
    dx = (g - c2 - xhat * c1) * rstd[:, None]
    if dresidual is not None:
        dx = dx + dresidual.to(cdt)
    dweight = (dyf * xhat).sum(dim=0).to(weight.dtype)
    dbias = dyf.sum(dim=0).to(bias.dtype)
    if emit_y:
        y = (xhat * weight.to(cdt) + bias.to(cdt)).to(x.dtype)
    else:
        y = x.new_empty((0,))
    return dx.to(x.dtype), dweight, dbias, y


# ------------------------------------------------------------------------------------------------------- GELU
def _check_approximate(approximate: str) -> None:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' (erf GELU) or 'tanh', got {approximate!r}")


def gelu(u: Tensor, approximate: str) -> Tensor:
    """gelu(u) in u's dtype: u·Φ(u), or 0.5u(1 + tanh z) = u·sigmoid(2z) with z = √(2/π)(u + 0.044715u³)."""
    _check_approximate(approximate)
    if approximate == "tanh":
        return u * torch.sigmoid(2.0 * _SQRT_2_OVER_PI * (u + GELU_TANH_COEF * u * u * u))
    return u * (0.5 * (1.0 + torch.erf(u * _INV_SQRT_2)))


def gelu_grad(u: Tensor, approximate: str) -> Tensor:
    """gelu'(u): Φ(u) + u·φ(u), or s + 2u·s(1-s)·dz/du with s = sigmoid(2z) (tanh written with sigmoid)."""
    _check_approximate(approximate)
    if approximate == "tanh":
        s = torch.sigmoid(2.0 * _SQRT_2_OVER_PI * (u + GELU_TANH_COEF * u * u * u))
        dz = _SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_COEF * u * u)
        return s + u * 2.0 * s * (1.0 - s) * dz
    return 0.5 * (1.0 + torch.erf(u * _INV_SQRT_2)) + u * torch.exp(-0.5 * u * u) * _INV_SQRT_2PI


def bias_gelu(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    """gelu(x + bias): (N, H) in x.dtype."""
    cdt = compute_dtype(x)
    u = x.to(cdt) if bias is None else x.to(cdt) + bias.to(cdt)
    return gelu(u, approximate).to(x.dtype)


def gelu_bwd(da: Tensor, u: Tensor, approximate: str) -> Tensor:
    """dU = dA * gelu'(u), recomputed from the pre-activation u: (N, H) in u.dtype."""
    cdt = compute_dtype(u)
    return (da.to(cdt) * gelu_grad(u.to(cdt), approximate)).to(u.dtype)


# --------------------------------------------------------------------------------- fused FFN recompute / backward
def _mm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Matrix product in the inputs' common dtype (bf16 stays bf16, as a GPU GEMM with fp32 accumulation would)."""
    dt = torch.promote_types(a.dtype, b.dtype)
    return (a.to(dt) @ b.to(dt)).to(out_dtype)


def ffn_recompute(
    x1: Tensor,
    mean: Tensor,
    rstd: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    w1: Tensor,
    b1: Tensor,
    dy: Tensor,
    w2: Tensor,
    approximate: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ffn/block recompute, two GEMMs sharing one output tile (both reduce over d):
    u = LN(x1; mean, rstd) @ w1ᵀ + b1 and dA = dy @ w2, then a = gelu(u), dU = gelu'(u) * dA, db1 = Σ_rows dU.

    x1: (N, d), w1: (H, d), dy: (N, d), w2: (d, H) -> a (N, H), du (N, H) in dy.dtype, db1 (H,) fp32 (fp64 for fp64).
    Neither u, the LN output nor dA leaves the kernel; dA and dU stay fp32 until du is stored.
    """
    cdt = compute_dtype(dy)
    y = layer_norm_apply(x1, mean, rstd, ln_weight, ln_bias)  # (N, d), only inside the kernel on a GPU
    u = _mm(y.to(dy.dtype), w1.t(), cdt) + b1.to(cdt)  # (N, H)
    da = _mm(dy, w2, cdt)  # (N, H)
    du = da * gelu_grad(u, approximate)
    return gelu(u, approximate).to(dy.dtype), du.to(dy.dtype), du.sum(dim=0)


def linear_bias_gelu(x: Tensor, w: Tensor, b: Optional[Tensor], approximate: str) -> Tensor:
    """a = gelu(x @ wᵀ + b) with bias and GELU in the GEMM epilogue: x (N, K), w (H, K) -> (N, H) in x.dtype.

    The ffn/block forward: neither policy keeps u, so it never reaches memory.
    """
    cdt = compute_dtype(x)
    u = _mm(x, w.t(), cdt)
    if b is not None:
        u = u + b.to(cdt)
    return gelu(u, approximate).to(x.dtype)


def linear_gelu_bwd(dy: Tensor, w2: Tensor, u: Tensor, approximate: str) -> Tensor:
    """dU = (dY @ w2) * gelu'(u): dy (N, d), w2 (d, H), u (N, H) -> (N, H) in u.dtype (GELU' in the GEMM epilogue)."""
    da = _mm(dy, w2, torch.float64 if u.dtype == torch.float64 else torch.float32)
    return (da * gelu_grad(u.to(da.dtype), approximate)).to(u.dtype)


def gelu_linear_wgrad(dy: Tensor, u: Tensor, approximate: str) -> Tensor:
    """dW2 = dYᵀ @ gelu(u): dy (N, d), u (N, H) -> (d, H) in dy.dtype (GELU in the GEMM prologue)."""
    a = gelu(u.to(compute_dtype(u)), approximate).to(u.dtype)
    return _mm(dy.t(), a, dy.dtype)


# ---------------------------------------------------------------------------------- Llama family: RMSNorm, SwiGLU, RoPE
def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x (N, d) -> y (N, d), rstd (N,) fp32 (fp64 for fp64 x), with Hugging Face's cast order:
    rstd = rsqrt(mean(x²) + eps) in fp32, n = (x·rstd) rounded to x.dtype, y = weight · n stored in
    promote_types(x.dtype, weight.dtype) (an fp32 weight with bf16 x gives an fp32 y, as LlamaRMSNorm does)."""
    cdt = compute_dtype(x)
    xf = x.to(cdt)
    rstd = torch.rsqrt(xf.square().mean(dim=1) + eps)
    return rms_norm_apply(x, rstd, weight), rstd


def rms_norm_apply(x: Tensor, rstd: Tensor, weight: Tensor) -> Tensor:
    """Rebuild the RMSNorm output from x and its saved rstd: (N, d) in promote_types(x.dtype, weight.dtype)."""
    cdt = compute_dtype(x)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    n = (x.to(cdt) * rstd[:, None].to(cdt)).to(x.dtype)
    return (weight.to(cdt) * n.to(cdt)).to(out_dtype)


def rms_norm_bwd(
    dy: Tensor, x: Tensor, rstd: Tensor, weight: Tensor, dresidual: Optional[Tensor], emit_y: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """VJP of rms_norm_fwd rebuilding x̂ = x·rstd from the saved statistic.

    dx = rstd · (g - x̂ · mean(g · x̂)) with g = dy · weight, plus dresidual (in x.dtype);
    dweight = Σ_rows dy · n with n = x̂ rounded to x.dtype (in weight.dtype); y = weight · n if emit_y else (0,).
    """
    cdt = compute_dtype(x)
    xhat = x.to(cdt) * rstd[:, None].to(cdt)
    dyf = dy.to(cdt)
    g = dyf * weight.to(cdt)
    dx = (g - xhat * (g * xhat).mean(dim=1, keepdim=True)) * rstd[:, None].to(cdt)
    if dresidual is not None:
        dx = dx + dresidual.to(cdt)
    n = xhat.to(x.dtype).to(cdt)
    dweight = (dyf * n).sum(dim=0).to(weight.dtype)
    if emit_y:
        y = (weight.to(cdt) * n).to(torch.promote_types(x.dtype, weight.dtype))
    else:
        y = x.new_empty((0,))
    return dx.to(x.dtype), dweight, y


def silu_grad(g: Tensor) -> Tensor:
    """silu'(g) = σ(g) (1 + g (1 - σ(g)))."""
    s = torch.sigmoid(g)
    return s * (1.0 + g * (1.0 - s))


def swiglu_fwd(g: Tensor, u: Tensor) -> Tensor:
    """h = silu(g) · u: g, u (N, F) -> (N, F) in g.dtype, computed in fp32."""
    cdt = compute_dtype(g)
    gf = g.to(cdt)
    return (gf * torch.sigmoid(gf) * u.to(cdt)).to(g.dtype)


def _swiglu_grads(dh: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """dg = dh · u · silu'(g), du = dh · silu(g), all in dh's (compute) dtype."""
    return dh * u * silu_grad(g), dh * g * torch.sigmoid(g)


def swiglu_bwd(dh: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """VJP of swiglu_fwd: dg (N, F) in g.dtype, du (N, F) in u.dtype."""
    cdt = compute_dtype(g)
    dg, du = _swiglu_grads(dh.to(cdt), g.to(cdt), u.to(cdt))
    return dg.to(g.dtype), du.to(u.dtype)


def geglu_fwd(g: Tensor, u: Tensor) -> Tensor:
    """h = gelu_tanh(g) · u (GeGLU: Gemma, ModernBERT): g, u (N, F) -> (N, F) in g.dtype, computed in fp32."""
    cdt = compute_dtype(g)
    return (gelu(g.to(cdt), "tanh") * u.to(cdt)).to(g.dtype)


def geglu_bwd(dh: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """VJP of geglu_fwd: dg = dh · u · gelu_tanh'(g), du = dh · gelu_tanh(g); dg (N, F) in g.dtype, du in u.dtype."""
    cdt = compute_dtype(g)
    dhf, gf, uf = dh.to(cdt), g.to(cdt), u.to(cdt)
    return (dhf * uf * gelu_grad(gf, "tanh")).to(g.dtype), (dhf * gelu(gf, "tanh")).to(u.dtype)


def _linear_f32(x: Tensor, w: Tensor, b: Optional[Tensor], cdt: torch.dtype) -> Tensor:
    y = _mm(x, w.t(), cdt)
    return y if b is None else y + b.to(cdt)


def linear_swiglu(x: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor]) -> Tensor:
    """h = silu(x w_gateᵀ + b_gate) · (x w_upᵀ + b_up): x (N, K), w_* (F, K) -> (N, F) in x.dtype.

    Two GEMMs on one output tile with SwiGLU in the epilogue: g and u stay fp32 and never reach memory."""
    cdt = compute_dtype(x)
    g = _linear_f32(x, w_gate, b_gate, cdt)
    u = _linear_f32(x, w_up, b_up, cdt)
    return (g * torch.sigmoid(g) * u).to(x.dtype)


def swiglu_linear_bwd(dy: Tensor, w_down: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """dH = dy @ w_down (fp32, never stored), then dg, du in the epilogue: dy (N, d), w_down (d, F) -> 2 x (N, F)."""
    cdt = compute_dtype(g)
    dg, du = _swiglu_grads(_mm(dy, w_down, cdt), g.to(cdt), u.to(cdt))
    return dg.to(g.dtype), du.to(u.dtype)


def swiglu_linear_wgrad(dy: Tensor, g: Tensor, u: Tensor) -> Tensor:
    """dW_down = dyᵀ @ h with h = swiglu_fwd(g, u) rebuilt in the GEMM prologue: (d, F) in dy.dtype."""
    return _mm(dy.t(), swiglu_fwd(g, u), dy.dtype)


def swiglu_ffn_recompute(
    x1: Tensor,
    rstd: Tensor,
    norm_weight: Tensor,
    w_gate: Tensor,
    b_gate: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    dy: Tensor,
    w_down: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The SwiGLU ffn/block recompute: three GEMMs reducing over d on one (rows x F) output tile.

    n = RMSNorm(x1; rstd, norm_weight) cast to dy.dtype, g = n w_gateᵀ + b_gate, u = n w_upᵀ + b_up, dH = dy w_down
    (all fp32), then h = silu(g) · u, dg, du written in dy.dtype. x1 (N, d), w_gate/w_up (F, d), dy (N, d),
    w_down (d, F) -> h, dg, du (N, F). Neither n, g, u nor dH leaves the kernel.
    """
    cdt = compute_dtype(dy)
    n = rms_norm_apply(x1, rstd, norm_weight).to(dy.dtype)  # (N, d), only inside the kernel on a GPU
    g = _linear_f32(n, w_gate, b_gate, cdt)  # (N, F)
    u = _linear_f32(n, w_up, b_up, cdt)  # (N, F)
    dg, du = _swiglu_grads(_mm(dy, w_down, cdt), g, u)
    return (g * torch.sigmoid(g) * u).to(dy.dtype), dg.to(dy.dtype), du.to(dy.dtype)


def rotate_half(x: Tensor) -> Tensor:
    """The half-split rotation of Hugging Face's RoPE: (x1, x2) -> (-x2, x1) over the last dim."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotate_half_t(z: Tensor) -> Tensor:
    """The transpose of rotate_half: (z1, z2) -> (z2, -z1)."""
    h = z.shape[-1] // 2
    return torch.cat((z[..., h:], -z[..., :h]), dim=-1)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q (B, T, hq, dh) and k (B, T, hk, dh) with cos/sin (B|1, T, dh), in fp32.

    inverse=False: x·cos + rotate_half(x)·sin. inverse=True, its exact adjoint (the VJP, for dq and dk):
    x·cos + rotate_half_t(x·sin). Outputs contiguous in q.dtype and k.dtype."""
    cdt = compute_dtype(q)
    c, s = cos.to(cdt)[:, :, None, :], sin.to(cdt)[:, :, None, :]  # (B|1, T, 1, dh)

    def one(x: Tensor) -> Tensor:
        xf = x.to(cdt)
        out = xf * c + (rotate_half_t(xf * s) if inverse else rotate_half(xf) * s)
        return out.to(x.dtype).contiguous()

    return one(q), one(k)


# ------------------------------------------------------------------------------ LM head: linear + cross-entropy
def _ce_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], cdt: torch.dtype) -> Tensor:
    """z = hidden @ weightᵀ (+ bias): (N, V) in cdt. The GEMM runs in the inputs' dtype (bf16 logits are rounded to
    bf16, as Hugging Face's lm_head output is, before they are widened); the bias is added in cdt."""
    z = _mm(hidden, weight.t(), cdt)
    return z if bias is None else z + bias.to(cdt)


def linear_cross_entropy_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    label_smoothing: float,
    chunk_bytes: int,
) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy of the logits z = hidden @ weightᵀ + bias, and their logsumexp.

    hidden (N, d), weight (V, d), bias (V,)?, labels (N,) int -> losses (N,), lse (N,) in fp32 (fp64 for fp64 hidden).
    lse_i = log Σ_c exp z_ic; with ε = label_smoothing (F.cross_entropy's definition, targets (1-ε)·onehot + ε/V):
    loss_i = lse_i - (1-ε)·z_{i,y_i} - ε·mean_c z_ic, and loss_i = 0 where labels_i == ignore_index (lse_i is still
    the row's logsumexp). The kernels keep their chunk buffers within ``chunk_bytes``; this definition is unchunked.
    """
    cdt = compute_dtype(hidden)
    z = _ce_logits(hidden, weight, bias, cdt)  # (N, V)
    lse = torch.logsumexp(z, dim=1)
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0).long()
    z_y = z.gather(1, target[:, None])[:, 0]
    loss = lse - (1.0 - label_smoothing) * z_y
    if label_smoothing != 0.0:
        loss = loss - label_smoothing * z.mean(dim=1)
    return torch.where(valid, loss, 0.0), lse


def linear_cross_entropy_bwd(
    dloss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    label_smoothing: float,
    chunk_bytes: int,
    need_dweight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """VJP of linear_cross_entropy_fwd's losses, from the saved lse (the logits are rebuilt):
    dz_ic = dloss_i · (softmax(z)_ic - ε/V - (1-ε)·[c == y_i]), 0 on ignored rows; dz is rounded to hidden.dtype
    before the two GEMMs (as the grad of HF's bf16 logits is). dhidden = dz @ weight (N, d) hidden.dtype;
    dweight = dzᵀ @ hidden (V, d) weight.dtype, or (0,) when not need_dweight; dbias = Σ_i dz_i (V,) bias.dtype, or
    (0,) without a bias. The kernels chunk the vocabulary (each dweight row in one GEMM) and sum dhidden over the
    chunks in fp32.
    """
    cdt = compute_dtype(hidden)
    z = _ce_logits(hidden, weight, bias, cdt)  # (N, V)
    v = z.shape[1]
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0).long()
    dz = torch.exp(z - lse.to(cdt)[:, None]) - label_smoothing / v
    dz = dz - (1.0 - label_smoothing) * torch.nn.functional.one_hot(target, v).to(cdt)
    dz = dz * torch.where(valid, dloss.to(cdt), 0.0)[:, None]
    dz_t = dz.to(hidden.dtype)
    dhidden = _mm(dz_t, weight, cdt).to(hidden.dtype)
    dweight = _mm(dz_t.t(), hidden, cdt).to(weight.dtype) if need_dweight else hidden.new_empty((0,))
    dbias = dz.sum(dim=0).to(bias.dtype) if bias is not None else hidden.new_empty((0,))
    return dhidden, dweight, dbias
