"""The ``reference`` backend: every op's reference math (the op table's ``reference`` column), on any device."""

from __future__ import annotations

from typing import Callable, Optional

from ... import ops

AUTO_DEVICES = ("cpu", "cuda", "meta")


def unavailable(device_type: Optional[str] = None) -> Optional[str]:
    return None


def impls() -> dict[str, Callable]:
    return {name: spec.reference for name, spec in ops.table.OPS.items()}
