"""Which kernel runs behind each ``ckpt_ext::*`` op: the backend switch.

The op graph never changes; a backend only chooses the implementation an op's kernel calls for a device.

| backend     | CPU tensors                                   | CUDA tensors                                   |
|-------------|-----------------------------------------------|------------------------------------------------|
| `reference` | ckpt_ext.reference (plain PyTorch)            | ckpt_ext.reference                             |
| `cpp`       | csrc/cpu kernels (`ckpt_ext::*_kernel` ops)   | csrc/cuda kernels (same ops)                   |
| `cuda`      | csrc kernels (their CPU registration)         | csrc/cuda kernels                              |
| `triton`    | Triton kernels, only under TRITON_INTERPRET=1 | Triton kernels (ckpt_ext.kernels)              |
| `auto`      | `cpp` if built, else `reference`              | `triton`, else `cuda` if built, else reference |

An op a backend does not implement runs the reference math (itself aten calls on the same device); `implements()`
tells which ops each backend covers. Select with ``set_backend(name)`` (also a context manager) or the environment
variable ``CKPT_EXT_BACKEND``. Nothing here imports triton or touches CUDA until a kernel is actually requested.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from typing import Callable

from . import reference

BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")

_state = threading.local()


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown ckpt_ext backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    name = getattr(_state, "name", None)
    return _env_backend() if name is None else name


@functools.cache
def _env_backend() -> str:
    """CKPT_EXT_BACKEND, read once (when the first op asks): set it before the process starts; switch at run time
    with set_backend."""
    return _validate(os.environ.get("CKPT_EXT_BACKEND", "auto"))


class set_backend:
    """Select the kernel backend: ``set_backend("cpp")`` for the rest of the thread, or ``with set_backend(...):``."""

    def __init__(self, name: str):
        _validate(name)
        _require(name)
        self._previous = getattr(_state, "name", None)
        _state.name = name

    def __enter__(self) -> set_backend:
        return self

    def __exit__(self, *exc) -> None:
        _state.name = self._previous


# ------------------------------------------------------------------------------------------------ availability
@functools.cache
def cpp_available() -> bool:
    try:
        importlib.import_module("ckpt_ext._C")
    except ImportError:
        return False
    return True


@functools.cache
def cuda_ext_available() -> bool:
    if not cpp_available():
        return False
    import torch

    return int(torch.ops.ckpt_ext.cuda_version()) >= 0


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _require(name: str) -> None:
    if name in ("cpp", "cuda") and not cpp_available():
        raise RuntimeError(
            f"backend {name!r} needs the C++ extension ckpt_ext._C, which is not built; "
            "install the package with `pip install --no-build-isolation .` (needs a C++ compiler and torch)"
        )
    if name == "cuda" and not cuda_ext_available():
        raise RuntimeError(
            "backend 'cuda' needs ckpt_ext._C built with CUDA kernels, but it was built CPU-only "
            "(torch.ops.ckpt_ext.cuda_version() == -1); rebuild with CKPT_EXT_BUILD_CUDA=1 on a CUDA torch"
        )
    if name == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' needs the triton package: `pip install triton`")


# -------------------------------------------------------------------------------------------------- resolution
def _cpp_impls() -> dict[str, Callable]:
    from .ops import cpp_bridge

    return cpp_bridge.IMPLS


@functools.cache
def _triton_impls() -> dict[str, Callable]:
    """launchers.IMPLS with the flash-attention launchers' ops (gqa and packed attention) and the LM head merged."""
    from .kernels import flash_attention_launchers, launchers, linear_cross_entropy

    return {**launchers.IMPLS, **flash_attention_launchers.IMPLS, **linear_cross_entropy.IMPLS}


def implements(name: str) -> frozenset[str]:
    """The ops for which backend ``name`` has its own kernels (the rest run reference math)."""
    if name == "reference":
        return frozenset()
    if name in ("cpp", "cuda"):
        return frozenset(_cpp_impls()) if cpp_available() else frozenset()
    if name == "triton":
        return frozenset(_triton_impls()) if triton_available() else frozenset()
    raise ValueError(f"implements() takes a concrete backend, not {name!r}")


def concrete_backend(device_type: str) -> str:
    """The backend that runs ops on ``device_type`` now (``auto`` resolved)."""
    name = get_backend()
    if name != "auto":
        return name
    if device_type == "cuda":
        if triton_available():
            return "triton"
        return "cuda" if cuda_ext_available() else "reference"
    if device_type == "cpu" and cpp_available():
        return "cpp"
    return "reference"


class _KernelTable(dict):
    """op name -> its implementation under one concrete backend for one device type, resolved on first use."""

    def __init__(self, name: str, device_type: str):
        super().__init__()
        self.name, self.device_type = name, device_type

    def __missing__(self, op: str) -> Callable:
        impl = self[op] = _resolve(self.name, op, self.device_type)
        return impl


_tables: dict[tuple[str, str], _KernelTable] = {}


def kernel_table(device_type: str) -> _KernelTable:
    """Every op's implementation for tensors on ``device_type`` under the current backend, as one mapping filled on
    first use (the block's eager fast path looks its kernels up in it)."""
    name = concrete_backend(device_type)
    table = _tables.get((name, device_type))
    if table is None:
        table = _tables[(name, device_type)] = _KernelTable(name, device_type)
    return table


def kernel(op: str, device_type: str) -> Callable:
    """The implementation of ``op`` for tensors on ``device_type`` under the current backend (resolved once per
    (backend, op, device): every op call asks, so the hot path is two dict lookups)."""
    return kernel_table(device_type)[op]


def _resolve(name: str, op: str, device_type: str) -> Callable:
    if name == "reference":
        return getattr(reference, op)
    if name == "triton":
        if device_type == "cpu" and not triton_interpreting():
            raise RuntimeError(
                "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before ckpt_ext.kernels is imported"
            )
        impls = _triton_impls()
    else:
        _require(name)
        impls = _cpp_impls()
    return impls.get(op) or getattr(reference, op)
