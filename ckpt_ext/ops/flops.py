"""Registers the op table's FLOP formulas (``OpSpec.flops``: the ops that multiply matrices, formulas beside each op
in ops/*.py) with torch.utils.flop_counter.FlopCounterMode.

torch.utils.flop_counter imports triton when it is first imported, and ckpt_ext promises not to import triton at import
time. So the formulas are registered the moment torch.utils.flop_counter is imported by anyone (a post-import hook on
the meta path), or at once if it already is.
"""

from __future__ import annotations

import importlib.abc
import sys

from .table import OPS

_MODULE = "torch.utils.flop_counter"


def _register() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    for spec in OPS.values():
        packet = spec.op._opoverload._overloadpacket
        if spec.flops is not None and packet not in flop_registry:
            register_flop_formula(packet)(spec.flops)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds torch.utils.flop_counter through the normal finders, then registers our formulas once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            _register()

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if _MODULE in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
