"""Whether the C++ extension ckpt_ext._C is built (importing it runs its op registrations), and with CUDA kernels:
what the cpp and cuda backends and aten_attention's extension routes ask before using it."""

from __future__ import annotations

import functools
import importlib


@functools.cache
def built() -> bool:
    try:
        importlib.import_module("ckpt_ext._C")
    except ImportError:
        return False
    return True


@functools.cache
def cuda_built() -> bool:
    """ckpt_ext._C has its CUDA kernels (built with CKPT_EXT_BUILD_CUDA=1 on a CUDA torch)."""
    if not built():
        return False
    import torch

    return int(torch.ops.ckpt_ext.cuda_version()) >= 0
