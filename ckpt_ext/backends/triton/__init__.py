"""The ``triton`` backend: the Triton kernels of ckpt_ext.kernels behind launchers with the graph ops' signatures.

launchers.py        LayerNorm, GELU, dropout and the GELU-MLP matmuls      launch_utils.py  coverage, views, grids
llama_launchers.py  RMSNorm, RoPE and the SwiGLU-MLP matmuls
gated_launchers.py  SwiGLU and GeGLU pointwise (the Llama, Gemma / ModernBERT MLPs)
attention.py        flash attention (grouped-query and packed qkv)         lm_head.py       linear + cross-entropy
Each launcher checks what its kernel covers and runs the reference math (or aten_attention's routes) otherwise, so
every call returns the reference's result. Importing this module imports nothing; ``impls()`` imports triton.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Optional

AUTO_DEVICES = ("cuda",)


@functools.cache
def installed() -> bool:
    """Whether triton imports (asked when a kernel is first resolved, never at package import)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable(device_type: Optional[str] = None) -> Optional[str]:
    if not installed():
        return "backend 'triton' needs the triton package: `pip install triton`"
    if device_type == "cpu" and not interpreting():
        return "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before ckpt_ext.kernels is imported"
    return None


@functools.cache
def impls() -> dict[str, Callable]:
    from . import attention, gated_launchers, launchers, llama_launchers, lm_head

    return {**launchers.IMPLS, **llama_launchers.IMPLS, **gated_launchers.IMPLS, **attention.IMPLS, **lm_head.IMPLS}
