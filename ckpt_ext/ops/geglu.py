"""GeGLU ops of the Gemma / ModernBERT MLP, ``down(gelu_tanh(gate(n)) · up(n))`` (the gated MLP form "geglu").

geglu_fwd(g (N, F), u (N, F)) -> h = gelu_tanh(g)·u (N, F) g.dtype
geglu_bwd(dh, g, u) -> dg = dh·u·gelu_tanh'(g), du = dh·gelu_tanh(g)
    gelu_tanh(g) = g/2·(1 + tanh(√(2/π)(g + 0.044715 g³)))
fp32 pointwise math. The MLP segment (block_parts/mlp.py) runs GeGLU from these two ops under every policy: the
policy's save set is the same as SwiGLU's (g and u, or nothing); what ffn / block rebuild is rebuilt by the norm,
the gate/up GEMMs and geglu_fwd instead of one fused recompute kernel. Math: reference.py.
"""

from __future__ import annotations

from .. import reference
from .gated import define_gated

geglu_fwd, geglu_bwd = define_gated(reference.geglu_fwd, reference.geglu_bwd)
