"""The ``cpp`` backend: the C++ extension ckpt_ext._C's kernel ops (csrc/cpu; csrc/cuda when built with CUDA), routed
by bridge.py; attention runs ckpt_ext/backends/aten_attention.py. Importing this module loads nothing."""

from __future__ import annotations

from typing import Callable, Optional

from ..extension import built

AUTO_DEVICES = ("cpu",)

MISSING = (
    "needs the C++ extension ckpt_ext._C, which is not built; install the package with "
    "`pip install --no-build-isolation .` (needs a C++ compiler and torch)"
)


def unavailable(device_type: Optional[str] = None) -> Optional[str]:
    return None if built() else f"backend 'cpp' {MISSING}"


def impls() -> dict[str, Callable]:
    from .bridge import IMPLS

    return IMPLS
