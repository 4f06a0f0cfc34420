"""Shared test helpers: blocks with copied weights, float64 references, the tolerance rule."""

from __future__ import annotations

import copy

import torch

from ckpt_ext import FusedCheckpointBlock, TransformerBlock
from ckpt_ext.block import init_block_


def make_block(d, heads=4, *, dtype=torch.float32, seed=0, **kwargs) -> TransformerBlock:
    torch.manual_seed(seed)
    blk = TransformerBlock(d, heads, **kwargs)
    init_block_(blk, std=0.2)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters so their gradients are exercised
        for ln in (blk.ln_1, blk.ln_2):
            ln.weight.add_(0.1 * torch.randn_like(ln.weight))
            if ln.bias is not None:
                ln.bias.add_(0.1 * torch.randn_like(ln.bias))
    return blk.to(dtype)


def run_step(module, x, grad, **kwargs):
    """(output, dx, grads of every parameter in named_parameters order)."""
    x = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x, **kwargs)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad for _, p in module.named_parameters()]


def fused_copy(block: TransformerBlock, policy: str, dtype=None) -> FusedCheckpointBlock:
    blk = copy.deepcopy(block)
    if dtype is not None:
        blk = blk.to(dtype)
    return FusedCheckpointBlock.from_block(blk, policy=policy)


def assert_within_torch_error(ours, torch_same_dtype, ref64, factor=3.0, atol=1e-6, names=None):
    """Tolerance rule: |ours - ref64| <= factor * max|torch - ref64| + atol, element-wise bound, per tensor."""
    for i, (a, b, r) in enumerate(zip(ours, torch_same_dtype, ref64)):
        torch_err = (b.double() - r).abs().max().item()
        torch.testing.assert_close(
            a.double(), r, rtol=0.0, atol=factor * torch_err + atol,
            msg=lambda m, i=i, e=torch_err: f"{names[i] if names else i}: {m} (torch's own error {e:.3g})",
        )  # fmt: skip


def apply_layer_kinds(model, layer_classes, kinds):
    """A Hugging Face model with one strategy per layer (the layers whose class name is in layer_classes, in order):
    "eager", "checkpoint" (Hugging Face's non-reentrant gradient checkpointing) or a ckpt_ext policy name."""
    from ckpt_ext.integrations.huggingface import apply_fused_checkpointing

    if "checkpoint" in kinds:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    assert len(layers) == len(kinds)
    for layer, kind in zip(layers, kinds):
        if kind != "checkpoint":
            layer.gradient_checkpointing = False
        if kind not in ("eager", "checkpoint"):
            apply_fused_checkpointing(layer, policy=kind)
    return model


def assert_step_within_bf16_error(step, step_ref, step64, factor=3.0):
    """A bf16 step (loss, {name: grad}) of ours against Hugging Face's own bf16 step, both measured against the
    float64 model's: our loss error and each gradient's relative error stay within ``factor`` times Hugging Face's
    (gradient norms floored at 1e-3 of the largest: key biases have zero gradient in exact math)."""
    (loss, grads), (loss_ref, grads_ref), (loss64, grads64) = step, step_ref, step64
    floor = 1e-3 * max(g.norm() for g in grads64.values())

    def rel(g, g64):
        return ((g.double() - g64).norm() / torch.maximum(g64.norm(), floor)).item()

    assert abs(loss.item() - loss64.item()) <= factor * abs(loss_ref.item() - loss64.item()) + 1e-3
    for name, g64 in grads64.items():
        ours, theirs = rel(grads[name], g64), rel(grads_ref[name], g64)
        assert ours <= factor * theirs + 2e-2, f"{name}: {ours:.3f} vs HF bf16 {theirs:.3f}"
