"""The ``ckpt_ext::*`` op graph. Importing this package registers every op (schema, fake, autograd, FLOP formula);
table.OPS is the op table (one row per op) that backends, FLOP counting and the schema test read."""

from . import flops, table  # noqa: F401  (table: ops.table.OPS)
from .attention import attention_bwd, attention_fwd, gqa_attention_bwd, gqa_attention_fwd
from .cross_entropy import linear_cross_entropy_bwd, linear_cross_entropy_fwd  # noqa: F401  (opcheck: tests/test_linear_cross_entropy.py)
from .dropout import dropout_add
from .ffn import ffn_recompute, gelu_linear_wgrad, linear_bias_gelu, linear_dropout_add, linear_gelu_bwd
from .geglu import geglu_bwd, geglu_fwd
from .gelu import bias_gelu, gelu_bwd
from .layer_norm import layer_norm_bwd, layer_norm_fwd
from .rms_norm import rms_norm_bwd, rms_norm_fwd
from .rotary import rope
from .swiglu import (
    linear_swiglu,
    swiglu_bwd,
    swiglu_ffn_recompute,
    swiglu_fwd,
    swiglu_linear_bwd,
    swiglu_linear_wgrad,
)

flops.install()

__all__ = [
    "attention_bwd",
    "attention_fwd",
    "bias_gelu",
    "dropout_add",
    "ffn_recompute",
    "geglu_bwd",
    "geglu_fwd",
    "gelu_bwd",
    "gelu_linear_wgrad",
    "gqa_attention_bwd",
    "gqa_attention_fwd",
    "layer_norm_bwd",
    "layer_norm_fwd",
    "linear_bias_gelu",
    "linear_dropout_add",
    "linear_gelu_bwd",
    "linear_swiglu",
    "rms_norm_bwd",
    "rms_norm_fwd",
    "rope",
    "swiglu_bwd",
    "swiglu_ffn_recompute",
    "swiglu_fwd",
    "swiglu_linear_bwd",
    "swiglu_linear_wgrad",
]
