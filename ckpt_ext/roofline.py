"""A roofline cost model of one block's training step, for machines without a GPU.

One forward + backward of one pre-LN block (parameters and input requiring grad) runs under FakeTensorMode on CPU
fake tensors (no compute; fake CUDA tensors cannot run backward without a GPU). A TorchDispatchMode records every op
that reaches the dispatcher, ``ckpt_ext::*`` ops as one kernel each, with
    flops   torch.utils.flop_counter's formulas (incl. the ones ckpt_ext registers for its ops; CPU SDPA kernels are
            priced like the CUDA ones),
    bytes   every tensor argument read (at most its storage) + every output written; ops whose outputs alias an
            input (view, t, transpose, detach, _unsafe_view, ...), bare allocations and metadata queries cost nothing,
and prices it at max(flops / PEAK_FLOPS, bytes / PEAK_BYTES_PER_S) + LAUNCH_S (H200 ceilings measured with torch:
bf16 matmul and device-to-device copy). The step time is the sum over ops; overhead is relative to "eager".

Variants: "eager" (the plain layer), "checkpoint" / "checkpoint_reentrant" (torch.utils.checkpoint, use_reentrant
False / True), "selective" (torch selective checkpointing saving matmul and attention outputs), and the ckpt_ext
policies "none", "pointwise", "ffn", "block_keep_attn", "block". The layer is ``layer``: "block" (ckpt_ext's
TransformerBlock: the GPT-2 form, or the Llama form with activation="swiglu", RoPE tables given; placement="post",
causal=False: the BERT form), "hf_llama" (transformers' own LlamaDecoderLayer, sdpa) or "hf_bert" (transformers'
BertLayer, sdpa, post-LN, bidirectional; attn_dropout sets both its attention-probability and hidden dropout, as
BERT's config ships them equal); the policies convert the Hugging Face layers with apply_fused_checkpointing.
Retained memory: bytes of the storages created during forward that are still alive after it (the graph's saved
tensors, the block output excluded).

Attention conditions (LayerShape.attn_dropout, .padding): probability dropout in training, and a padding mask
((B, 1, T, T) bool keep-mask, as transformers builds it for left padding; an input of the step, not retained). Eager
``F.scaled_dot_product_attention`` is priced as the fused kernel a GPU runs for it (FlashAttention with in-kernel
dropout, the memory-efficient kernel reading an additive mask after SDPA's bool-to-float conversion): traced on CPU,
SDPA would take aten's math path with dropout or a mask and materialize (B, h, T, T), which no GPU run does.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .lora import BLOCK_LORA_TARGETS, HF_LORA_TARGETS, add_peft_lora

PEAK_FLOPS = 788e12
PEAK_BYTES_PER_S = 4.3e12
LAUNCH_S = 3e-6

TORCH_VARIANTS = ("eager", "checkpoint", "checkpoint_reentrant", "selective")
POLICY_VARIANTS = ("none", "pointwise", "ffn", "block_keep_attn", "block")
LAYERS = ("block", "hf_llama", "hf_bert")
VARIANTS = TORCH_VARIANTS + POLICY_VARIANTS
FREE_OPS = ("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
            "_local_scalar_dense")  # fmt: skip


@dataclass
class OpCost:
    name: str
    flops: int
    bytes: int
    seconds: float
    phase: str = "forward"  # "forward" or "backward"


@dataclass
class StepTrace:
    ops: list[OpCost] = field(default_factory=list)
    retained_bytes: int = 0
    input_bytes: int = 0

    @property
    def seconds(self) -> float:
        return sum(op.seconds for op in self.ops)

    @property
    def flops(self) -> int:
        return sum(op.flops for op in self.ops)

    @property
    def bytes(self) -> int:
        return sum(op.bytes for op in self.ops)


def price(flops: float, nbytes: float) -> float:
    return max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES_PER_S) + LAUNCH_S


def _sdpa_cpu_fwd_flops(q, k, v, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q.shape, k.shape, v.shape)


def _sdpa_cpu_bwd_flops(grad_out, q, k, v, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape)


def _flop_formula(packet):
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    if packet == aten._scaled_dot_product_flash_attention_for_cpu:
        return _sdpa_cpu_fwd_flops
    if packet == aten._scaled_dot_product_flash_attention_for_cpu_backward:
        return _sdpa_cpu_bwd_flops
    return flop_registry.get(packet)


def _is_view_or_free(func) -> bool:
    if func._overloadpacket.__name__ in FREE_OPS:
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _read_bytes(t: torch.Tensor) -> int:
    nbytes = t.numel() * t.element_size()
    try:
        return min(nbytes, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return nbytes


class CostRecorder(TorchDispatchMode):
    """Records each dispatched op's FLOPs, bytes and modeled time, and the storages forward creates."""

    def __init__(self):
        super().__init__()
        self.ops: list[OpCost] = []
        self.phase = "forward"
        self.created: dict[int, tuple] = {}  # storage key -> (weakref, nbytes), forward only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_view_or_free(func):
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:  # metadata queries (prim::device, sizes): no kernel
            return out
        nbytes = sum(_read_bytes(t) for t in ins) + sum(t.numel() * t.element_size() for t in outs)
        formula = _flop_formula(func._overloadpacket)
        flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
        name = f"{func._overloadpacket._qualified_op_name}"
        self.ops.append(OpCost(name, flops, nbytes, price(flops, nbytes), self.phase))
        if self.phase == "forward":
            from torch.multiprocessing.reductions import StorageWeakRef

            for t in outs:
                storage = t.untyped_storage()
                self.created[id(storage)] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def alive_bytes(self, exclude: tuple = ()) -> int:
        skip = {id(t.untyped_storage()) for t in exclude}
        seen, total = set(), 0
        for key, (ref, nbytes) in self.created.items():
            if ref.expired() or key in skip or ref.cdata in seen:
                continue
            seen.add(ref.cdata)
            total += nbytes
        return total


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_efficient_attention.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default}  # fmt: skip

    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def forward_fn(variant: str, block, position_embeddings=None, attn_mask=None):
    """x -> out of one block under ``variant`` (FusedCheckpointBlock variants share ``block``'s parameters), with
    ``position_embeddings`` and ``attn_mask`` (the block's keyword) passed on when given.

    ``block``: a ckpt_ext TransformerBlock, or a Hugging Face Llama-family decoder layer (policies convert a copy's
    class in place: ``block`` itself is left unconverted)."""
    from torch.utils.checkpoint import checkpoint

    from .block import FusedCheckpointBlock, TransformerBlock

    hf = not isinstance(block, TransformerBlock)
    kw = {} if position_embeddings is None else {"position_embeddings": position_embeddings}
    if attn_mask is not None:
        kw["attn_mask"] = attn_mask

    def call(module):
        if not kw:
            return module
        return lambda x: module(x, **kw)

    if variant == "eager":
        return call(block)
    if variant == "checkpoint":
        return lambda x: checkpoint(call(block), x, use_reentrant=False)
    if variant == "checkpoint_reentrant":
        return lambda x: checkpoint(call(block), x, use_reentrant=True)
    if variant == "selective":
        return lambda x: checkpoint(call(block), x, use_reentrant=False, context_fn=_selective_context)
    if variant in POLICY_VARIANTS:
        if hf:
            from .integrations.hf_common import fused_class
            from .integrations.huggingface import FAMILIES

            fused = copy.copy(block)  # shares parameters and submodules; only the class is swapped
            adapter = next(a for a in FAMILIES if isinstance(block, a.layer_classes()))
            fused.__class__ = fused_class(type(block), adapter)
            fused._ckpt_policy = variant
            return call(fused)
        return call(FusedCheckpointBlock.from_block(block, policy=variant))
    raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """module.to(dtype) for fake parameters (Module.to cannot swap fake tensors): re-wrap each parameter."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))
    return module


@dataclass(frozen=True)
class LayerShape:
    """One layer's shape: the GPT-2 block by default; activation="swiglu" (or layer="hf_llama") the Llama form."""

    d_model: int
    seq: int
    batch: int
    n_heads: int
    dtype: torch.dtype = torch.bfloat16
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    n_kv_heads: Optional[int] = None
    d_ff: Optional[int] = None
    layer: str = "block"
    attn_dropout: float = 0.0
    padding: bool = False
    lora: int = 0  # PEFT LoRA rank on every linear, base weights frozen (0: none)
    placement: str = "pre"  # layer="block": "post" is the post-LN (BERT) form
    causal: bool = True  # layer="block": False for bidirectional attention (encoders)

    @property
    def llama(self) -> bool:
        return self.activation == "swiglu" or self.layer == "hf_llama"

    @property
    def hidden(self) -> int:
        return self.d_ff if self.d_ff is not None else int(self.mlp_ratio * self.d_model)


def _fake_lora(layer, rank: int, targets):
    """PEFT LoRA on a layer of fake parameters: PEFT moves each new adapter with Module.to, which cannot swap fake
    tensors, so the (small) adapters are made as real tensors outside the fake mode and then turned fake."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
    fake = torch._subclasses.fake_tensor.FakeTensor
    with unset_fake_temporarily():
        layer = add_peft_lora(layer, rank, targets)
        real = [(m, n, p.detach(), p.requires_grad) for m in layer.modules()
                for n, p in m.named_parameters(recurse=False) if not isinstance(p, fake)]  # fmt: skip
    for module, name, tensor, grad in real:
        setattr(module, name, torch.nn.Parameter(mode.from_tensor(tensor), requires_grad=grad))
    return layer


def _make_layer(shape: LayerShape):
    """The layer under trace (fake parameters) and its RoPE tables (None for the GPT-2 form)."""
    from .block import TransformerBlock

    s = shape
    dh = s.d_model // s.n_heads
    pe = None
    if s.llama:
        pe = tuple(torch.empty(1, s.seq, dh, dtype=s.dtype) for _ in range(2))
    if s.layer == "hf_llama":
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        cfg = LlamaConfig(hidden_size=s.d_model, intermediate_size=s.hidden, num_attention_heads=s.n_heads,
                          num_key_value_heads=s.n_kv_heads or s.n_heads, num_hidden_layers=1)  # fmt: skip
        cfg._attn_implementation = "sdpa"
        layer = LlamaDecoderLayer(cfg, 0)
        layer = _fake_lora(layer, s.lora, HF_LORA_TARGETS) if s.lora else layer
        return _cast(layer, s.dtype).train(), pe
    if s.layer == "hf_bert":
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertLayer

        cfg = BertConfig(hidden_size=s.d_model, intermediate_size=s.hidden, num_attention_heads=s.n_heads,
                         num_hidden_layers=1, attention_probs_dropout_prob=s.attn_dropout,
                         hidden_dropout_prob=s.attn_dropout)  # fmt: skip
        cfg._attn_implementation = "sdpa"
        if s.lora:
            raise ValueError("lora: modeled for layer 'block' and 'hf_llama', not 'hf_bert'")
        layer = BertLayer(cfg)
        return _cast(layer, s.dtype).train(), pe
    if s.layer != "block":
        raise ValueError(f"unknown layer {s.layer!r}; choose one of {', '.join(LAYERS)}")
    kw = dict(activation="swiglu", n_kv_heads=s.n_kv_heads) if s.llama else dict(activation=s.activation)
    if s.placement != "pre":
        kw["norm_placement"] = s.placement
    block = TransformerBlock(s.d_model, s.n_heads, d_ff=s.hidden, attn_dropout=s.attn_dropout, causal=s.causal, **kw)
    if s.lora:
        block = _fake_lora(block, s.lora, BLOCK_LORA_TARGETS["llama" if s.llama else "gpt2"])
    return _cast(block, s.dtype).train(), pe


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as one fused kernel (aten's flash-for-CPU op: its FLOP formula is the CUDA
    kernels'; it reads k/v heads per group as GQA kernels do), a bool mask first converted as SDPA does. Under
    autocast q, k and v are cast first, as autocast casts F.scaled_dot_product_attention's inputs (the aten op itself
    is not on autocast's lists)."""
    device = q.device.type if q.device.type in ("cpu", "cuda") else "cpu"
    if torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        q, k, v = (t.to(low) if t.is_floating_point() else t for t in (q, k, v))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype).masked_fill_(~attn_mask, float("-inf"))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )[0]


@contextlib.contextmanager
def _fused_sdpa_pricing():
    """F.scaled_dot_product_attention is _fused_sdpa while the step is traced. An attribute swap, not a
    TorchFunctionMode: torch.utils.checkpoint's recompute in backward does not run under the forward's function modes,
    and every caller (this package's block, transformers' sdpa_attention_forward) looks the function up on the module
    at call time."""
    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


@functools.lru_cache(maxsize=128)
def _trace(variant: str, shape: LayerShape) -> StepTrace:
    from torch._subclasses.fake_tensor import FakeTensorMode

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    with FakeTensorMode(allow_non_fake_inputs=False):
        block, pe = _make_layer(shape)
        x = torch.empty(shape.batch, shape.seq, shape.d_model, dtype=shape.dtype, requires_grad=True)
        grad = torch.empty(shape.batch, shape.seq, shape.d_model, dtype=shape.dtype)
        mask = None
        if shape.padding:
            if shape.layer != "block":
                raise ValueError("padding is modeled for layer='block' only")
            mask = torch.empty(shape.batch, 1, shape.seq, shape.seq, dtype=torch.bool)
        fn = forward_fn(variant, block, pe, attn_mask=mask)
        recorder = CostRecorder()
        with _fused_sdpa_pricing(), recorder:
            out = fn(x)
            out = out[0] if isinstance(out, (tuple, list)) else out  # (B, T, d); BertLayer 4.57 returns a 1-tuple
            retained = recorder.alive_bytes(exclude=(out,))
            recorder.phase = "backward"
            out.backward(grad)
    return StepTrace(recorder.ops, retained, x.numel() * x.element_size())


def _shape(d_model, seq, batch, n_heads, dtype=torch.bfloat16, mlp_ratio=4.0, activation="gelu", **kw) -> LayerShape:
    return LayerShape(d_model, seq, batch, n_heads, dtype, mlp_ratio, activation, **kw)


def trace_step(variant: str, *args, **kwargs) -> list[OpCost]:
    """Every op of one forward + backward of one layer under ``variant``, with FLOPs, bytes and modeled seconds.

    Arguments: d_model, seq, batch, n_heads, dtype=bf16, mlp_ratio=4.0, activation="gelu", and the keywords
    n_kv_heads, d_ff, layer ("block" or "hf_llama"), attn_dropout, padding of LayerShape."""
    return list(_trace(variant, _shape(*args, **kwargs)).ops)


def step_trace(variant: str, *args, **kwargs) -> StepTrace:
    """The full trace: ops, retained bytes (storages from forward alive after it) and the input's bytes."""
    return _trace(variant, _shape(*args, **kwargs))


def step_time(variant: str, *args, **kwargs) -> float:
    """Modeled seconds of one forward + backward of one block (arguments as trace_step)."""
    return step_trace(variant, *args, **kwargs).seconds


def overhead(variant: str, *args, baseline: str = "eager", **kwargs) -> float:
    """Modeled step-time overhead of ``variant`` relative to ``baseline`` (0.24 = 24% slower)."""
    return step_time(variant, *args, **kwargs) / step_time(baseline, *args, **kwargs) - 1.0


def retained_memory(variant: str, *args, measured: bool = False, **kwargs) -> int:
    """Activation bytes kept for backward beyond the input: policies.retained_bytes for ckpt_ext policies on the
    ckpt_ext block (unless ``measured``), the measured forward storages alive after forward otherwise."""
    shape = _shape(*args, **kwargs)
    if variant in POLICY_VARIANTS and not measured and shape.layer == "block":
        from .policies import retained_bytes

        size = torch.empty((), dtype=shape.dtype).element_size()
        extra = dict(n_kv_heads=shape.n_kv_heads, norm="rmsnorm", mlp="swiglu") if shape.llama else {}
        extra["placement"] = shape.placement
        extra["ln2_from_out"] = shape.placement == "post" and size >= 4  # block_parts/norm.invertible: fp32 outputs
        return retained_bytes(variant, shape.batch, shape.seq, shape.d_model, shape.n_heads, shape.hidden,
                              act_bytes=size, matmul_bytes=size, stat_bytes=4, **extra)  # fmt: skip
    return _trace(variant, shape).retained_bytes


def summarize(ops: list[OpCost], phase: Optional[str] = None) -> dict[str, tuple[int, float]]:
    """op name -> (count, seconds), optionally for one phase: where a variant's time goes."""
    table: dict[str, tuple[int, float]] = {}
    for op in ops:
        if phase is None or op.phase == phase:
            count, secs = table.get(op.name, (0, 0.0))
            table[op.name] = (count + 1, secs + op.seconds)
    return table


__all__ = [
    "LAUNCH_S", "PEAK_BYTES_PER_S", "PEAK_FLOPS", "VARIANTS", "LayerShape", "OpCost", "StepTrace", "overhead", "price",
    "retained_memory", "step_time", "step_trace", "summarize", "trace_step",
]  # fmt: skip
