"""Device-independent measurements of a training step: retained activation bytes and FLOPs.

retained_activation_bytes(fn, *args): bytes of the storages created while ``fn(*args)`` runs (the forward) that are
still alive after it returns, minus the output's own storage: exactly what the autograd graph keeps for backward,
including tensors stashed inside torch.utils.checkpoint or custom autograd.Functions (an outer saved_tensors_hooks
would miss those). Works on CPU; on CUDA it measures the same graph.

count_flops(fn, *args): total FLOPs seen by torch.utils.flop_counter.FlopCounterMode, which counts ckpt_ext's fused
matmul ops through their registered formulas and sees recompute done inside backward.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _storage_refs(tree) -> set[StorageWeakRef]:
    return {StorageWeakRef(t.untyped_storage()) for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class _StorageRecorder(TorchDispatchMode):
    """Records a weak reference to every storage an op creates (outputs that are not views of its inputs)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[StorageWeakRef, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _storage_refs((args, kwargs))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in inputs:
                    self.storages.setdefault(ref, t.untyped_storage().nbytes())
        return out


def retained_activation_bytes(fn: Callable, *args, **kwargs) -> tuple[int, object]:
    """(bytes kept alive by the forward beyond its output, the output). Call with grad enabled to measure training."""
    recorder = _StorageRecorder()
    with recorder:
        out = fn(*args, **kwargs)
    out_storages = _storage_refs(out)
    kept = sum(nbytes for ref, nbytes in recorder.storages.items() if not ref.expired() and ref not in out_storages)
    return kept, out


def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _cpu_sdpa_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


# torch's registry prices the CUDA SDPA kernels but not aten's flash kernel for CPU; price it the same way so a CPU
# count of TransformerBlock / torch.utils.checkpoint includes attention like ours does.
_CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """Total FLOPs of ``fn(*args, **kwargs)`` (run it forward + backward inside ``fn`` to count a training step)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS)
    with counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def training_step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One forward + backward of ``module`` on ``x`` with upstream gradient ``grad`` (for count_flops / timing)."""
    module(x).backward(grad)
