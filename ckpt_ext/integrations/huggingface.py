"""``apply_fused_checkpointing(model, policy="ffn", every=1) -> int``: fused checkpointing for Hugging Face models.

Finds the transformer layers of every registered family (``FAMILIES``: GPT-2's GPT2Block, ViT's ViTLayer, the Llama
family's Llama/Mistral/Qwen2/Qwen3 decoder layers, the post-LN encoders' BERT/RoBERTa/XLM-R/ELECTRA layers and
DistilBERT's TransformerBlock, ModernBERT's ModernBertEncoderLayer) in module order and converts the ``every``-th,
2·``every``-th, ... of them (every=1: all) in place, by swapping each layer's class for a ``Fused<Layer>`` subclass
(hf_common.py). Parameters, submodules and ``state_dict()`` keys do not change, so saving, loading, optimizers, DDP and
FSDP2 see the same model. Calling it again updates the policy of converted layers (they count as converted). Each family
adapter (hf_gpt2.py, hf_vit.py, hf_llama.py, hf_bert.py, hf_modernbert.py) provides:

    layer_classes() -> classes to convert        check(layer) -> raises ValueError for configs it cannot fuse
    forward(layer, original_forward, bound) -> the layer's output (fused, or the original forward)

``remove_fused_checkpointing(model)`` restores the original classes. transformers is imported only when called.
"""

from __future__ import annotations

from torch import nn

from ..policies import get_policy
from .hf_bert import BertFamilyAdapter, DistilBertAdapter
from .hf_common import ContainerRefs, FusedLayerMixin, fused_class, unfused_class
from .hf_gpt2 import GPT2Adapter
from .hf_llama import LlamaFamilyAdapter
from .hf_loss import SUPPORTED_MODEL_TYPES, patch_causal_lm_loss, unpatch_causal_lm_loss
from .hf_modernbert import ModernBertAdapter
from .hf_vit import ViTAdapter

FAMILIES = (
    GPT2Adapter(),
    ViTAdapter(),
    LlamaFamilyAdapter(),
    BertFamilyAdapter(),
    DistilBertAdapter(),
    ModernBertAdapter(),
)


def supported() -> str:
    return "; ".join(f.name for f in FAMILIES)


def _family_layers(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """(layer, adapter) for every layer of a registered family, in module order."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("apply_fused_checkpointing needs transformers (pip install 'ckpt_ext[hf]')") from e
    classes = [(adapter, adapter.layer_classes()) for adapter in FAMILIES]
    found = []
    for module in model.modules():
        for adapter, layer_classes in classes:
            if isinstance(module, layer_classes):
                found.append((module, adapter))
                break
    return found


def apply_fused_checkpointing(model: nn.Module, policy: str = "ffn", every: int = 1, fused_loss: bool = False) -> int:
    """Convert layers in place; returns how many layers now run fused checkpointing with ``policy``.

    ``fused_loss``: the causal LM in ``model`` (itself, or the one a PEFT model wraps) computes its training loss with
    the fused LM head (ckpt_ext.linear_cross_entropy: no (B, T, V) logits; ``logits`` is None in the output), see
    integrations/hf_loss.py."""
    get_policy(policy)
    if not isinstance(fused_loss, bool):
        raise TypeError(f"fused_loss must be a bool, got {type(fused_loss).__name__}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    layers = _family_layers(model)
    if not layers:
        raise TypeError(f"apply_fused_checkpointing: {type(model).__name__} has no supported transformer layers; "
                        f"supported model families: {supported()}")  # fmt: skip
    chosen = [(layer, adapter) for i, (layer, adapter) in enumerate(layers, start=1) if i % every == 0]
    for layer, adapter in chosen:
        adapter.check(layer)
    for layer, adapter in chosen:
        if not isinstance(layer, FusedLayerMixin):
            layer.__class__ = fused_class(type(layer), adapter)
        layer._ckpt_policy = policy
    _link_containers(model, [layer for layer, _ in layers])
    if fused_loss:
        patch_causal_lm_loss(_causal_lm(model))
    return len(chosen)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The outermost supported causal LM in ``model``: the model itself, or the transformers model a wrapper (a
    PeftModel, which forwards ``config`` and ``get_output_embeddings``) holds."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        if module.config.model_type in SUPPORTED_MODEL_TYPES and module.get_output_embeddings() is not None:
            return module
    raise TypeError(f"fused_loss=True: {type(model).__name__} holds no supported causal LM with an LM head "
                    f"(model types: {', '.join(SUPPORTED_MODEL_TYPES)})")  # fmt: skip


def _link_containers(model: nn.Module, layers: list) -> None:
    """Give each converted layer weak references to the modules above it with a ``gradient_checkpointing`` flag whose
    family layers are all converted (their flag is cleared when gradient_checkpointing_enable() reaches the layer, and
    now if it is already set: hf_common's module docstring)."""
    family = {id(layer) for layer in layers}
    for layer in layers:
        layer.__dict__.pop("_ckpt_containers", None)
    for module in model.modules():
        if id(module) in family or not hasattr(module, "gradient_checkpointing"):
            continue
        below = [m for m in module.modules() if id(m) in family]
        if below and all(isinstance(m, FusedLayerMixin) for m in below):
            for layer in below:
                above = (*layer.__dict__.get("_ckpt_containers", ()), module)
                layer.__dict__["_ckpt_containers"] = ContainerRefs(above)
            if module.gradient_checkpointing:
                below[0].gradient_checkpointing = True  # logs once and clears the flag


def remove_fused_checkpointing(model: nn.Module) -> int:
    """Undo apply_fused_checkpointing (restores each converted layer's own class); returns how many were restored.

    Layers whose class was swapped again afterwards (e.g. by FSDP2's fully_shard) are left as they are."""
    restored = 0
    for module in model.modules():
        unpatch_causal_lm_loss(module)
        original = unfused_class(type(module))
        if original is not None:
            module.__class__ = original
            module.__dict__.pop("_ckpt_policy", None)
            module.__dict__.pop("_ckpt_containers", None)
            restored += 1
    return restored
