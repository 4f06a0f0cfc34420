"""Which kernel runs behind each ``ckpt_ext::*`` op: the dispatch table the ops call.

The op graph never changes; a backend only chooses the implementation an op's kernel calls for a device. Backends
are the folders of ckpt_ext/backends, listed once in ``backends.REGISTRY`` (which also orders ``auto``):

| backend     | CPU tensors                                   | CUDA tensors                                   |
|-------------|-----------------------------------------------|------------------------------------------------|
| `reference` | ckpt_ext.reference (plain PyTorch)            | ckpt_ext.reference                             |
| `cpp`       | csrc/cpu kernels (`ckpt_ext::*_kernel` ops)   | csrc/cuda kernels (same ops)                   |
| `cuda`      | csrc kernels (their CPU registration)         | csrc/cuda kernels                              |
| `triton`    | Triton kernels, only under TRITON_INTERPRET=1 | Triton kernels (ckpt_ext.kernels)              |
| `auto`      | `cpp` if built, else `reference`              | `triton`, else `cuda` if built, else reference |

An op a backend does not implement runs the reference math (itself aten calls on the same device); `implements()`
tells which ops each backend covers. Select with ``set_backend(name)`` (also a context manager) or the environment
variable ``CKPT_EXT_BACKEND``. Backends are loaded by name (importlib) when first asked: nothing here imports triton or
touches CUDA until a kernel is actually requested, and this module imports no backend.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from types import ModuleType
from typing import Callable

from .backends import REGISTRY

BACKENDS = ("auto", *REGISTRY)

_state = threading.local()


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown ckpt_ext backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def _module(name: str) -> ModuleType:
    return importlib.import_module(REGISTRY[name])


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
        if name != "auto":
            _require(name)
        self._previous = getattr(_state, "name", None)
        _state.name = name

    def __enter__(self) -> set_backend:
        return self

    def __exit__(self, *exc) -> None:
        _state.name = self._previous


# ------------------------------------------------------------------------------------------------ availability
def available(name: str, device_type: str | None = None) -> bool:
    """Whether backend ``name`` can run (on ``device_type``, when given)."""
    return _module(name).unavailable(device_type) is None


def cpp_available() -> bool:
    return available("cpp")


def cuda_ext_available() -> bool:
    return available("cuda")


def triton_available() -> bool:
    return available("triton")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _require(name: str, device_type: str | None = None) -> None:
    reason = _module(name).unavailable(device_type)
    if reason is not None:
        raise RuntimeError(reason)


# -------------------------------------------------------------------------------------------------- resolution
def impls(name: str) -> dict[str, Callable]:
    """Backend ``name``'s own kernels: op name -> implementation (loads the backend)."""
    _require(name)
    return _module(name).impls()


def implements(name: str) -> frozenset[str]:
    """The ops for which backend ``name`` has its own kernels (the rest run reference math)."""
    if name == "auto" or name not in REGISTRY:
        raise ValueError(f"implements() takes a concrete backend, not {name!r}")
    if name == "reference" or not available(name):
        return frozenset()
    return frozenset(impls(name))


def concrete_backend(device_type: str) -> str:
    """The backend that runs ops on ``device_type`` now (``auto``: the first registered backend that runs on that
    device by default and is available)."""
    name = get_backend()
    if name != "auto":
        return name
    for candidate in REGISTRY:
        module = _module(candidate)
        if device_type in module.AUTO_DEVICES and module.unavailable() is None:
            return candidate
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
    _require(name, device_type)
    own = _module(name).impls().get(op)
    return own if own is not None else _module("reference").impls()[op]
