"""``ckpt_ext.linear_cross_entropy``: the loss of ``F.cross_entropy(hidden @ weightᵀ + bias, labels, ...)`` without
ever holding the (N, V) logits.

Design: recompute in backward. The forward (``ckpt_ext::linear_cross_entropy_fwd``) walks the tokens in chunks and
keeps per row only the fp32 loss and logsumexp (8 bytes a token); the backward (``_bwd``) walks the vocabulary in
chunks: it rebuilds a chunk's logits for all tokens from hidden, weight and the saved logsumexp (exact: each row's
normalizer is known), forms dz = dloss·(softmax - (1-ε)·onehot - ε/V) in place, writes that chunk's dweight rows
with one GEMM over all tokens (complete, fp32-accumulated inside the GEMM: no (V, d) fp32 accumulator, no per-chunk
read-modify-write of dweight) and adds dz @ W_chunk into an fp32 dhidden (N·d: small beside V·d).
Liger-Kernel instead computes the gradients inside the forward (no recompute, 2·N·V·d fewer FLOPs, i.e. 4 instead of
6 matmul passes over the logits): we do not, because (1) a forward under no_grad or in evaluation must not pay for
gradients, nor hold dhidden (N, d) and dweight (V, d) buffers between forward and backward; (2) gradients made in
forward must assume the loss is the graph's output with gradient 1 (Liger scales them afterwards), which breaks for a
loss that is weighted, combined or differentiated twice; (3) it is the project's recompute-in-backward design. The
cost is one extra GEMM pass (+33% head FLOPs; the head is ~V/(12·d·L) of a model's FLOPs: a few percent).

Chunks come from a byte budget (``chunk_bytes``, default 32 MiB on CPU, 256 MiB on CUDA) for the kernels' working
buffers (fp32 logits plus a copy in the GEMM dtype): forward rows = budget / (V·bytes), backward columns =
budget / (N·bytes) (``chunk_len``), never a fraction of N; rounded down to a multiple of 16 (GEMM tiles) when the
budget allows. The ops take the budget itself.

Reductions: per-row losses are fp32 (fp64 for fp64 inputs), 0 on ignored rows. "mean" divides the sum by the number
of rows whose label is not ignore_index (NaN when there is none, as F.cross_entropy); "sum" sums; "none" returns the
(N,) row losses. ``num_items_in_batch`` follows Hugging Face's fixed_cross_entropy (transformers 4.57 loss_utils):
when given, the sum is divided by it, whatever ``reduction`` says ("mean" or "sum"). The loss is fp32 like Hugging
Face's ForCausalLMLoss, which upcasts the logits. Under autocast, hidden, weight and bias are cast to the autocast
dtype first, as autocast does for the linear layer this replaces; gradients flow back through those casts.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .ops.cross_entropy import linear_cross_entropy_fwd

DEFAULT_CHUNK_BYTES = {"cuda": 256 << 20}
CPU_CHUNK_BYTES = 32 << 20
REDUCTIONS = ("mean", "sum", "none")


def chunk_len(chunk_bytes: int, other: int, dtype: torch.dtype, limit: int) -> int:
    """Length of a chunk along one side of the (N, V) logits whose buffers, ``other`` elements across, fit
    ``chunk_bytes``: an fp32 logit (fp64 for fp64) and, for a 16-bit dtype, its copy in that dtype per element.
    Forward rows: chunk_len(b, V, dtype, N); backward columns: chunk_len(b, N, dtype, V). In [1, limit], a multiple
    of 16 when ≥ 16. The C++ kernel applies the same rule (csrc/cpu/cross_entropy_cpu.cpp)."""
    acc = 8 if dtype == torch.float64 else 4
    extra = 2 if dtype in (torch.float16, torch.bfloat16) else 0
    length = max(1, chunk_bytes // max(1, other * (acc + extra)))
    if length >= 16:
        length -= length % 16
    return max(1, min(length, limit))


def _autocast(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dt = torch.get_autocast_dtype(device)
    cast = lambda t: t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(dt)
    return cast(hidden), cast(weight), cast(bias)


def _validate(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, num_items_in_batch,
              chunk_bytes) -> None:  # fmt: skip
    if not isinstance(hidden, Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"linear_cross_entropy: hidden must be a floating (N, d) tensor, got "
                         f"{tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__}")  # fmt: skip
    n, d = hidden.shape
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"linear_cross_entropy: weight must be (V, {d}) to match hidden (N, {d}), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")  # fmt: skip
    if weight.shape[0] == 0:
        raise ValueError("linear_cross_entropy: weight has no rows (V = 0)")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"linear_cross_entropy: weight dtype {weight.dtype} must equal hidden's {hidden.dtype} "
                         "(cast one, or run under torch.autocast)")  # fmt: skip
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"linear_cross_entropy: bias must be ({weight.shape[0]},) {hidden.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")  # fmt: skip
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32) or labels.shape != (n,):
        raise ValueError(f"linear_cross_entropy: labels must be an int64 or int32 ({n},) tensor, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
                         f"{' ' + str(labels.dtype) if isinstance(labels, Tensor) else ''}")  # fmt: skip
    for name, t in (("weight", weight), ("bias", bias), ("labels", labels)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"linear_cross_entropy: {name} is on {t.device}, hidden on {hidden.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "none" and num_items_in_batch is not None:
        raise ValueError("linear_cross_entropy: num_items_in_batch divides a sum: use reduction 'mean' or 'sum'")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_bytes is not None and chunk_bytes <= 0:
        raise ValueError(f"linear_cross_entropy: chunk_bytes must be positive, got {chunk_bytes}")
    if not torch.compiler.is_compiling() and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            first = int(labels[bad][0])
            raise ValueError(f"linear_cross_entropy: labels must be in [0, {weight.shape[0]}) or ignore_index "
                             f"({ignore_index}); found {first}")  # fmt: skip


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    num_items_in_batch: Optional[Union[Tensor, int]] = None,
    chunk_bytes: Optional[int] = None,
) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=..., reduction=..., label_smoothing=...)``
    computed chunk by chunk; never allocates (N, V). hidden (N, d), weight (V, d), bias (V,)?, labels (N,) int64/int32.
    Gradients for hidden, weight and bias (the weight may be tied to an embedding: autograd adds both gradients).
    Returns an fp32 scalar (fp64 for fp64 inputs), or (N,) for reduction="none". See the module docstring."""
    _validate(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, num_items_in_batch, chunk_bytes)
    device = hidden.device.type
    hidden, weight, bias = _autocast(hidden, weight, bias)
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES.get(device, CPU_CHUNK_BYTES)
    with torch.autocast(device, enabled=False):
        losses, _ = linear_cross_entropy_fwd(
            hidden, weight, bias, labels, int(ignore_index), float(label_smoothing), int(chunk_bytes)
        )  # (N,) fp32, 0 on ignored rows
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(losses.device)
        return losses.sum() / num_items_in_batch
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (labels != ignore_index).sum()
