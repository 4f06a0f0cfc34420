"""ckpt_ext: activation checkpointing of pre-LN transformer blocks with the recompute fused into backward kernels.

Importing the package registers the ``ckpt_ext::*`` ops; it never imports triton nor initializes CUDA.
``ckpt_ext.segments`` turns key lengths, (B, T) keep masks, cu_seqlens or packed position_ids into the segment ids the
blocks' ``segment_ids=`` takes (padding and packed sequences without a (B, 1, T, T) mask).
"""

from . import (
    ops,  # noqa: F401  (registers the op graph)
    segments,
)
from .apply import apply_checkpointing
from .backend import get_backend, set_backend
from .block import FusedCheckpointBlock, TransformerBlock
from .lm_head import linear_cross_entropy
from .planner import plan
from .policies import POLICIES, retained_bytes

__version__ = "0.1.0"

__all__ = [
    "POLICIES",
    "FusedCheckpointBlock",
    "TransformerBlock",
    "apply_checkpointing",
    "get_backend",
    "linear_cross_entropy",
    "plan",
    "retained_bytes",
    "segments",
    "set_backend",
]
