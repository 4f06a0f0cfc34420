"""The ``cuda`` backend: the cpp backend's kernel ops (ckpt_ext/backends/cpp), required to come with the CUDA kernels
of csrc/cuda (ckpt_ext._C built with CKPT_EXT_BUILD_CUDA=1 on a CUDA torch)."""

from __future__ import annotations

import functools
from typing import Callable, Optional

from .. import cpp

AUTO_DEVICES = ("cuda",)


@functools.cache
def built() -> bool:
    if not cpp.built():
        return False
    import torch

    return int(torch.ops.ckpt_ext.cuda_version()) >= 0


def unavailable(device_type: Optional[str] = None) -> Optional[str]:
    if not cpp.built():
        return f"backend 'cuda' {cpp.MISSING}"
    if not built():
        return (
            "backend 'cuda' needs ckpt_ext._C built with CUDA kernels, but it was built CPU-only "
            "(torch.ops.ckpt_ext.cuda_version() == -1); rebuild with CKPT_EXT_BUILD_CUDA=1 on a CUDA torch"
        )
    return None


def impls() -> dict[str, Callable]:
    return cpp.impls()
