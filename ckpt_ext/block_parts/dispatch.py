"""How the segments call the ``ckpt_ext::*`` ops: ``block_ops.<name>(*args)`` is the graph op ``ops.<name>``, or on
the eager fast path the kernel that graph op's body would call (same function, same arguments, bit-identical).

``EagerFastPath`` is entered around the block's hand-written forward and backward in eager mode only; under any
TorchDispatchMode (fake tensors, FLOP counters, the roofline recorder) and under torch.compile the graph ops run, so
what is measured is the op graph.
"""

from __future__ import annotations

import threading

import torch

from .. import backend, ops

_fast_path = threading.local()  # .table: backend.kernel_table of the device the fast path runs on, else None


class _BlockOps:
    """The ckpt_ext ops the block calls: ``_ops.<name>(*args)``. Normally the graph op ``ops.<name>``. On the eager
    fast path (``EagerFastPath``) the kernel that graph op's body calls, ``backend.kernel(name, device)``, is called
    directly instead: the same function on the same arguments, without torch's Python custom-op wrapper (~25 µs a call
    at tiny shapes, 10-20 ops a step) and without the body's argument checks (the block checked its inputs). So the
    results are the same bit for bit; under tracing, compile and dispatch modes the graph ops run (what is measured)."""

    def __getattr__(self, name: str):
        graph_op = getattr(ops, name)

        def call(*args):
            table = getattr(_fast_path, "table", None)
            return graph_op(*args) if table is None else table[name](*args)

        setattr(self, name, call)
        return call


block_ops = _BlockOps()


class EagerFastPath:
    """Entered around the block's hand-written forward and backward (and its no-grad forward), eager only:
    - dispatch below the Autograd keys: its ops are never differentiated there (forward runs without grad, a double
      backward raises), so each aten op skips its autograd kernel; autocast and version counters still apply (their
      keys are not excluded);
    - the ckpt_ext ops call their kernels directly (``_BlockOps``), resolved once per entry for ``device_type``.
    Off while a TorchDispatchMode is active (FakeTensorMode, FlopCounterMode, the roofline's recorder, op counters):
    below Autograd, composite ops (linear, matmul) would reach the mode undecomposed and uncounted, and the mode must
    see the graph ops. Under torch.compile the block runs as compiled.py's opaque ops instead."""

    def __init__(self, device_type: str):
        self.device_type = device_type

    def __enter__(self):
        self.active = not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
        if self.active:
            self.previous = getattr(_fast_path, "table", None)
            self.below = torch._C._AutoDispatchBelowAutograd()
            self.below.__enter__()
            _fast_path.table = backend.kernel_table(self.device_type)
        return self

    def __exit__(self, *exc):
        if self.active:
            _fast_path.table = self.previous
            self.below.__exit__(*exc)
