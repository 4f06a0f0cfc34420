"""Hugging Face causal LMs with the fused LM head: ``patch_causal_lm_loss(model)`` / ``unpatch_causal_lm_loss(model)``.

Supported: GPT-2 (GPT2LMHeadModel), Llama, Mistral, Qwen2, Qwen3 (*ForCausalLM). The patch wraps the model's forward.
A call in training, with grad enabled and ``labels`` given, runs the model's own forward with two stand-ins for the
duration of the call: lm_head.forward returns its input (hidden_states[:, slice_indices, :], exactly what the model
would multiply) and model.loss_function is a twin of transformers' ForCausalLMLoss (4.57 loss_utils) that, instead of
``logits.float()`` + ``fixed_cross_entropy``, calls ckpt_ext.linear_cross_entropy on those hidden states with
lm_head's weight and bias: labels padded with ignore_index and shifted by one (or ``shift_labels`` as given),
ignore_index (default -100), ``num_items_in_batch`` dividing the sum when given, else the mean over non-ignored
tokens. Everything else (logits_to_keep, return_dict, cache, hidden_states/attentions outputs, **kwargs) is the
model's own code. The output's ``logits`` is None (a tuple output drops it, as to_tuple drops a None field), as
Liger-Kernel does: no (B, T, V) tensor exists.
Without labels, in eval mode or under no_grad, the original forward runs untouched. A head the fused loss would not
reproduce exactly runs the original forward and says so once: final logit softcapping
(config.final_logit_softcapping), an lm_head that is not a plain nn.Linear (a LoRA / PEFT wrapper, a quantized
linear), or a loss_function that is not ForCausalLMLoss (a user override).
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..lm_head import linear_cross_entropy
from .hf_common import warn_once

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
_ORIGINAL = "_ckpt_ext_original_forward"


def _unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why the fused loss would not reproduce this model's loss exactly (None when it would)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    if getattr(model.config, "final_logit_softcapping", None) is not None:
        return "config.final_logit_softcapping is set (the logits are soft-capped before the loss)"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"lm_head is a {type(head).__name__}, not a plain nn.Linear (LoRA/PEFT or quantized head)"
    if model.loss_function is not ForCausalLMLoss:
        return "model.loss_function is not transformers' ForCausalLMLoss"
    return None


def _fused_loss_function(head: nn.Linear):
    """ForCausalLMLoss's signature and label handling, on hidden states instead of logits."""

    def loss_function(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                      **kwargs):  # fmt: skip
        hidden = logits  # (B, T', d): lm_head's input, passed through
        if shift_labels is None:
            labels = F.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (B·T', d)
        shift_labels = shift_labels.reshape(-1).to(hidden.device)  # (B·T',)
        return linear_cross_entropy(hidden, head.weight, shift_labels, bias=head.bias, ignore_index=ignore_index,
                                    num_items_in_batch=num_items_in_batch)  # fmt: skip

    return loss_function


def _drop_logits(out):
    """The model output with logits None: a fresh ModelOutput without the field, or the tuple without its entry."""
    if isinstance(out, tuple):
        return out[:1] + out[2:]  # (loss, logits, ...) -> (loss, ...), as to_tuple() leaves out a None field
    return type(out)(**{k: v for k, v in out.items() if k != "logits"})


def patch_causal_lm_loss(model: nn.Module) -> nn.Module:
    """Make ``model``'s training forward with labels compute its loss with ckpt_ext.linear_cross_entropy (in place;
    returns the model). Idempotent; undo with ``unpatch_causal_lm_loss``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or model.get_output_embeddings() is None:
        raise TypeError(f"patch_causal_lm_loss: {type(model).__name__} (model_type {model_type!r}) is not a supported "
                        f"causal LM; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")  # fmt: skip
    if _ORIGINAL in model.__dict__:
        return model
    original = model.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        labels = signature.bind_partial(*args, **kwargs).arguments.get("labels")
        if labels is None or not model.training or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        reason = _unsupported_reason(model)
        if reason is not None:
            warn_once(
                f"hf_loss:{type(model).__name__}:{reason}",
                f"ckpt_ext fused loss: {type(model).__name__} runs its original LM head and loss: {reason}",
            )
            return original(*args, **kwargs)  # fmt: skip
        head = model.get_output_embeddings()
        had_loss_function = "_loss_function" in model.__dict__
        saved_loss_function = model.__dict__.get("_loss_function")
        saved_head_forward = head.__dict__.get("forward")
        head.forward = lambda hidden_states: hidden_states  # lm_head's input reaches the loss function unmultiplied
        model.loss_function = _fused_loss_function(head)
        try:
            out = original(*args, **kwargs)
        finally:
            if saved_head_forward is None:
                del head.forward
            else:
                head.forward = saved_head_forward
            if had_loss_function:
                model.loss_function = saved_loss_function
            else:
                del model._loss_function
        return _drop_logits(out)

    model.forward = forward
    setattr(model, _ORIGINAL, original)
    return model


def unpatch_causal_lm_loss(model: nn.Module) -> nn.Module:
    """Undo patch_causal_lm_loss (a model that was not patched is returned unchanged)."""
    original = model.__dict__.pop(_ORIGINAL, None)
    if original is not None:
        if getattr(original, "__self__", None) is model and original.__func__ is type(model).forward:
            del model.forward
        else:
            model.forward = original
    return model
