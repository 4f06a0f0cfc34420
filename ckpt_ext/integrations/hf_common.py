"""Shared machinery of the Hugging Face adapters: class swapping, the fused-or-fallback decision, masks.

A converted layer keeps its identity: ``layer.__class__`` becomes a subclass ``Fused<Layer>`` of its own class (the
pattern FSDP2's ``fully_shard`` uses), so ``isinstance`` checks, submodules, parameters and ``state_dict()`` keys are
untouched. The subclass's ``forward`` asks the family adapter for the layer's parameter tensors (views and
concatenations of the original parameters, never copies held across calls) and runs ``ckpt_ext.block.fused_block``
when a training graph is being built; anything else (no_grad, generation with a filled KV cache, attention outputs,
head masks, cross-attention, hooks on the bypassed submodules) runs the original forward.

Masks are converted by hf_masks.py (once per model forward, shared by the layers).

Never silent: ``unsupported_submodule`` walks the layer's submodules at every forward (adapters can be added after
conversion, e.g. get_peft_model after apply_fused_checkpointing) and names the first one the fused block would bypass
incorrectly: a type other than a plain ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Dropout`` / ``nn.Identity`` / GPT-2's
``Conv1D`` / an activation from ``transformers.activations`` / a class of the layer's own modeling file (so PEFT LoRA
and DoRA layers, quantized linears, other tuners, ``modules_to_save`` wrappers, custom wrappers and class-level
replacements such as Liger's norms all count), forward/backward hooks or pre-hooks, or a forward replaced on the
instance (accelerate's offload hooks, HF 4.57's output recorders); global module hooks count too. The adapter then
runs the original forward and ``warn_once`` names the module and the reason. ~1 µs per submodule. One exception:
transformers 5.x's output-capturing forward hooks (installed at the first output_attentions / output_hidden_states
call and left in place for the model's life) are skipped when idle, i.e. when the call's collector does not ask for
their key (a later call without output_attentions); while they record, they count as any hook does.

Hugging Face's ``gradient_checkpointing_enable()``: a converted layer's ``gradient_checkpointing`` always reads False
(HF would wrap the fused block in torch.utils.checkpoint and recompute it twice); setting it True logs once that
ckpt_ext replaces it, and resets the flag of the modules above the layer whose family layers are all converted (e.g.
LlamaModel, GPT2Model), so ``model.is_gradient_checkpointing`` (any module's flag, in 4.57 and 5.x) does not claim
Hugging Face's checkpointing is on. Unconverted layers (``every`` > 1) keep it, and so does the claim.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from .. import lora
from ..lora import Linears

logger = logging.getLogger("ckpt_ext.integrations")
_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message)


class FusedLayerMixin:
    """Placed first in the MRO of ``Fused<Layer>``; ``_ckpt_adapter`` is set on each generated class."""

    _ckpt_adapter = None

    @property
    def gradient_checkpointing(self) -> bool:
        """Always False: Hugging Face's checkpointing (GradientCheckpointingLayer) would wrap the fused block in
        torch.utils.checkpoint and recompute it twice. Setting it True logs once and clears the flag of the modules
        above whose layers are all converted (see the module docstring)."""
        return False

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value) -> None:
        if not value:
            return
        warn_once(
            "hf-gradient-checkpointing",
            "ckpt_ext: gradient_checkpointing_enable() leaves converted layers "
            "to ckpt_ext's fused checkpointing, which replaces Hugging Face's (unconverted ones keep it)",
        )
        for module in self.__dict__.get("_ckpt_containers", ()):
            if getattr(module, "gradient_checkpointing", False):
                module.gradient_checkpointing = False

    def forward(self, *args, **kwargs):
        original = super().forward  # the model's own forward (FusedLayerMixin is first in the MRO)
        return self._ckpt_adapter.forward(self, original, bind(self._ckpt_signature, args, kwargs))


class ContainerRefs:
    """Weak references to the modules above a converted layer whose ``gradient_checkpointing`` flag describes only
    converted layers. A deep copy of the model points to the copied modules (found in deepcopy's memo); pickling keeps
    none."""

    def __init__(self, modules=()):
        self._refs = tuple(weakref.ref(m) for m in modules)

    def __iter__(self):
        return (m for m in (ref() for ref in self._refs) if m is not None)

    def __deepcopy__(self, memo):
        return ContainerRefs(memo[id(m)] for m in self if id(m) in memo)

    def __reduce__(self):
        return (ContainerRefs, ())


_FUSED_CLASSES: dict[type, type] = {}


def fused_class(cls: type, adapter) -> type:
    """The cached ``Fused<cls>`` subclass; registered in this module so that pickling by reference finds it."""
    if issubclass(cls, FusedLayerMixin):
        return cls
    if cls not in _FUSED_CLASSES:
        name = f"Fused{cls.__name__}"
        attrs = {"_ckpt_adapter": adapter, "_ckpt_signature": signature_of(cls.forward),
                 "_ckpt_origin": cls.__module__, "__module__": __name__}  # fmt: skip
        new = type(name, (FusedLayerMixin, cls), attrs)
        new.__qualname__ = name
        globals()[name] = new
        _FUSED_CLASSES[cls] = new
    return _FUSED_CLASSES[cls]


def unfused_class(cls: type) -> Optional[type]:
    """The model's own class behind a generated Fused<Layer> class; None for any other class (e.g. FSDP's wrappers)."""
    return next((orig for orig, new in _FUSED_CLASSES.items() if new is cls), None)


def needs_graph(x: Tensor, params) -> bool:
    """True when autograd will record this call: the only case where checkpointing saves anything."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p is not None and p.requires_grad for p in params)


def signature_of(forward) -> tuple:
    """(parameter names after self, their defaults, whether **kwargs is accepted) of a layer's forward."""
    params = list(inspect.signature(forward).parameters.values())[1:]
    named = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    defaults = {p.name: p.default for p in params if p.name in named and p.default is not p.empty}
    return named, defaults, any(p.kind == p.VAR_KEYWORD for p in params)


def bind(signature: tuple, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name (defaults filled in; what **kwargs would take under "kwargs"), plus the call itself
    under "args" / "call_kwargs". Plain dict work, so torch.compile traces it (inspect.Signature.bind it cannot)."""
    names, defaults, var_kw = signature
    if len(args) > len(names):
        raise TypeError(f"the layer's forward takes {len(names)} arguments, got {len(args)} positional")
    bound = dict(defaults)
    bound.update(zip(names, args))
    extra = {}
    for key, value in kwargs.items():
        if key in names:
            bound[key] = value
        else:
            extra[key] = value
    if extra and not var_kw:
        raise TypeError(f"the layer's forward got unexpected keyword arguments {sorted(extra)}")
    bound["kwargs"], bound["args"], bound["call_kwargs"] = extra, args, kwargs
    return bound


_PLAIN = (nn.Linear, nn.LayerNorm, nn.Dropout, nn.Identity)
_HOOKS = (("_forward_hooks", "a forward hook"), ("_forward_pre_hooks", "a forward pre-hook"),
          ("_backward_hooks", "a backward hook"), ("_backward_pre_hooks", "a backward pre-hook"))  # fmt: skip


def unsupported_submodule(layer: nn.Module, linear_paths: frozenset = frozenset()) -> Optional[str]:
    """'<path> <reason>' for the first submodule of ``layer`` the fused block cannot stand in for, or None.

    Allowed: exact plain torch types, GPT-2's Conv1D, transformers' activations and classes of the layer's own
    modeling file, without hooks or an instance-level forward (see the module docstring); at ``linear_paths`` (the
    adapter's linears, Linears.paths) also a PEFT LoRA layer, whose form read_linears checks."""
    glob = torch.nn.modules.module
    if glob._global_forward_hooks or glob._global_forward_pre_hooks or glob._global_backward_hooks:
        return "(any submodule): a global module hook is registered"
    origin = layer._ckpt_origin
    stack = [("", layer)]
    while stack:
        prefix, module = stack.pop()
        for name, child in module._modules.items():
            if child is None:
                continue
            path = prefix + name
            cls = type(child)
            if path in linear_paths and lora.is_lora_layer(child):  # its form is checked by read_linears
                problem = _lora_layer_problem(path, child)
                if problem is not None:
                    return problem
                continue
            if not (cls in _PLAIN or cls.__module__ in (origin, "transformers.activations") or _is_conv1d(cls)):
                return f"{path} is a {cls.__module__}.{cls.__qualname__}, not a plain nn.Linear / Conv1D / norm"
            for attr, what in _HOOKS:
                hooks = getattr(child, attr)
                if hooks and not (attr == "_forward_hooks" and all(map(_idle_output_recorder, hooks.values()))):
                    return f"{path} has {what}"
            own = child.__dict__.get("forward")
            if own is not None and getattr(own, "__func__", None) is not cls.forward:
                return f"{path} has its forward replaced on the instance"
            stack.append((path + ".", child))
    return None


def _idle_output_recorder(hook) -> bool:
    """Whether ``hook`` is transformers 5.x's output-capturing forward hook and records nothing in this call: the
    active collector is None or lacks the hook's key (e.g. 'attentions' when output_attentions is off)."""
    if getattr(hook, "__module__", None) != "transformers.utils.output_capturing":
        return False
    if getattr(hook, "__name__", None) != "output_capturing_hook":
        return False
    cells = dict(zip(hook.__code__.co_freevars, hook.__closure__ or ()))
    if "key" not in cells:
        return False
    from transformers.utils.output_capturing import _active_collector

    collected = _active_collector.get()
    return collected is None or cells["key"].cell_contents not in collected


def _lora_layer_problem(path: str, child: nn.Module) -> Optional[str]:
    """Hooks or an instance forward on a PEFT LoRA layer or its base, or a base that is not a plain linear."""
    for module, where in ((child, path), (child.base_layer, f"{path}.base_layer")):
        for attr, what in _HOOKS:
            if getattr(module, attr):
                return f"{where} has {what}"
        own = module.__dict__.get("forward")
        if own is not None and getattr(own, "__func__", None) is not type(module).forward:
            return f"{where} has its forward replaced on the instance"
    base = type(child.base_layer)
    if base is not nn.Linear and not _is_conv1d(base):
        return f"{path}.base_layer is a {base.__module__}.{base.__qualname__}, not a plain nn.Linear / Conv1D"
    return None


def read_linears(layer, linears: dict) -> Optional[Linears]:
    """lora.read_linears of ``linears`` (adapter.linears); None, after a one-time warning naming the module, where a
    PEFT LoRA layer has a form the fused block does not compute."""
    try:
        return lora.read_linears(linears)
    except lora.Unsupported as err:
        fallback(layer, f"lora-{err}", str(err))
        return None


def lora_eager_only(layer, lin: Linears) -> bool:
    """False (warned once) for LoRA adapters under torch.compile: the fused LoRA path runs eagerly only."""
    if lin.specs and torch.compiler.is_compiling():
        return fallback(layer, "lora-compile", "LoRA adapters under torch.compile (the fused LoRA path runs eagerly)")
    return True


def lora_seeded(specs: tuple) -> bool:
    """Whether a LoRA adapter's dropout needs the block's seed."""
    return any(spec.dropout > 0.0 for spec in specs)


def _is_conv1d(cls: type) -> bool:
    return cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"


def fallback(layer, key: str, reason: str) -> bool:
    """Warn once (per layer class and ``key``) that ``layer`` runs its original forward because of ``reason``; False."""
    name = type(layer).__name__.removeprefix("Fused")
    warn_once(f"{name}-{key}", f"ckpt_ext: {name} runs its original forward (not fused): {reason}")
    return False


def common_fallback(layer, impl: str, fused_impls: tuple, mask, lin: Linears) -> bool:
    """False (after a one-time warning) for what no adapter fuses: an attention implementation other than
    ``fused_impls``, a mask that is not a 2-D/4-D tensor (flex attention's BlockMask), an unsupported submodule or a
    hook. True otherwise."""
    if impl not in fused_impls:
        return fallback(layer, f"impl-{impl}", f"attention implementation {impl!r} (fused: {', '.join(fused_impls)})")
    if mask is not None and not (isinstance(mask, Tensor) and mask.dim() in (2, 4)):
        return fallback(layer, "mask-type", f"an attention mask of type {type(mask).__name__} (fused: a 2-D or 4-D "
                        "tensor)")  # fmt: skip
    problem = unsupported_submodule(layer, lin.paths)
    if problem is not None:
        return fallback(layer, problem, problem)
    return True


def eager_rows_ok(layer, impl: str, info, mask: Tensor) -> bool:
    """False (warned once) when eager attention meets a mask that leaves some query row no key (left padding), or one
    torch.compile does not let us read: Hugging Face's eager softmax gives such rows uniform weights over the keys
    (its mask is finfo.min, not -inf), the fused kernels give zeros (as SDPA does)."""
    if impl != "eager":
        return True
    empty = info.empty_rows(mask)
    if empty is None:
        return fallback(layer, "eager-compile", "eager attention with a mask under torch.compile (rows the mask leaves "
                        "without keys cannot be checked; attn_implementation='sdpa' fuses)")  # fmt: skip
    if empty:
        return fallback(layer, "eager-empty-rows", "eager attention with a mask that leaves query rows no key (e.g. "
                        "left padding): Hugging Face's eager softmax gives them uniform weights over the keys, the "
                        "fused kernels zeros; attn_implementation='sdpa' fuses")  # fmt: skip
    return True
