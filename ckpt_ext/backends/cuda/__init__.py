"""The ``cuda`` backend: the cpp backend's kernel ops (ckpt_ext/backends/cpp), required to come with the CUDA kernels
of csrc/cuda (ckpt_ext._C built with CKPT_EXT_BUILD_CUDA=1 on a CUDA torch)."""

from __future__ import annotations

from typing import Callable, Optional

from .. import cpp
from ..extension import built, cuda_built

AUTO_DEVICES = ("cuda",)


def unavailable(device_type: Optional[str] = None) -> Optional[str]:
    if not built():
        return f"backend 'cuda' {cpp.MISSING}"
    if not cuda_built():
        return (
            "backend 'cuda' needs ckpt_ext._C built with CUDA kernels, but it was built CPU-only "
            "(torch.ops.ckpt_ext.cuda_version() == -1); rebuild with CKPT_EXT_BUILD_CUDA=1 on a CUDA torch"
        )
    return None


def impls() -> dict[str, Callable]:
    return cpp.impls()
