"""Dropout seeds that stay correct under torch.compile and CUDA graphs.

Every dropout mask of a block call is a counter hash of (seed, element index) (ops/dropout.py), so one int64 seed per
call decides all of them: attention +0, residual 1 +1, residual 2 +2.

Eager: ``host_seed()`` draws the seed from torch's default CPU generator, ``torch.randint(0, SEED_HIGH, (1,))``, and
hands the kernels a Python int.
Compiled: an int drawn on the host while tracing would be a constant of the graph (every step the same masks), so under
torch.compile ``host_seed()`` returns ``DEVICE_SEED`` and the compiled block (compiled.py) draws the seed as a tensor
inside the graph with the same call on the input's device: each run of the graph draws a new one (on CPU from the
stream eager uses: inductor with ``fallback_random`` draws exactly eager's seeds), and torch's CUDA generator keeps
such a draw graph-safe (philox seed + offset advanced per replay). The seed tensor is read (``seed_value``) only
inside the block's opaque ops, so it is saved for backward and recompute replays the forward's masks.
FakeTensorMode (ckpt_ext.roofline, memory estimators): the eager seed is drawn from the real generator.
CUDA graphs: the kernels take the seed as a host int, so reading it needs a device sync that cannot be captured.
Under capture both paths raise a clear error instead of freezing one mask into the graph; the compiled path's seeded
ops carry ``torch.Tag.cudagraph_unsafe`` so ``mode="reduce-overhead"`` leaves them outside its graphs.
"""

from __future__ import annotations

import torch
from torch import Tensor

SEED_HIGH = 2**31 - 8  # seeds are in [0, SEED_HIGH): seed + 2 stays a positive int32
DEVICE_SEED = "device"  # BlockConfig.seed placeholder: "the compiled block draws this call's seed on the device"
# (a str, not an int: dynamo traces an .item() seed as a SymInt it cannot tell from an int without a data guard)

_CAPTURE_ERROR = (
    "ckpt_ext: a dropout seed cannot be drawn or read during CUDA graph capture (the kernels take it as a host int, "
    "so a captured graph would replay one mask forever). Capture the block with dropout=0 and attn_dropout=0, or "
    "use torch.compile(mode='reduce-overhead'), which keeps the seeded block ops outside its CUDA graphs."
)


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph (False, without touching CUDA, when it is unused)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def host_seed():
    """This call's dropout seed as an int (eager), or DEVICE_SEED while torch.compile traces."""
    if torch.compiler.is_compiling():
        return DEVICE_SEED
    if capturing():
        raise RuntimeError(_CAPTURE_ERROR)
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # under FakeTensorMode (shape/cost tracing) the draw is still a real number
        return int(torch.randint(0, SEED_HIGH, (1,)).item())


def is_device_seed(seed) -> bool:
    return isinstance(seed, str) and seed == DEVICE_SEED


def seed_tensor(seed, device: torch.device) -> Tensor:
    """(1,) int64 seed on ``device``: drawn now for DEVICE_SEED (the same draw as host_seed), else ``seed``'s value
    (an int, or the SymInt of an .item() seed traced with capture_scalar_outputs)."""
    if is_device_seed(seed):
        return torch.randint(0, SEED_HIGH, (1,), device=device)
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def seed_value(seed: Tensor) -> int:
    """The int a (1,) seed tensor holds; a clear error instead of a sync during CUDA graph capture."""
    if seed.device.type == "cuda" and capturing():
        raise RuntimeError(_CAPTURE_ERROR)
    return int(seed.item())
