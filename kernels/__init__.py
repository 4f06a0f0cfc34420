"""Triton kernels of the ``triton`` backend (installed as ``ckpt_ext.kernels``; importing this package imports nothing).

layer_norm.py      LayerNorm forward (fp32 mean/rstd) and backward (x̂ rebuilt, residual folded, fp32 dγ/dβ partials)
pointwise.py       bias + GELU, GELU backward from u            gelu_math.py   GELU / GELU' jit helpers (both forms)
dropout.py         hash-mask dropout + residual add (bit-exact with the reference mask)
ffn_recompute.py   FC1 (LN2 prologue) + dA = dY·W2 on one tile → GELU, GELU'·dA, db1 partials (ffn/block recompute)
linear_gelu.py     FC1 forward with bias + GELU epilogue (ffn/block forward, u never written)
linear_dropout_add.py  projection / FC2 GEMM with bias + hash dropout + residual epilogue (output never written)
ffn_pointwise.py   dA GEMM with GELU' epilogue (pointwise policy)
act_linear_wgrad.py  dW2 / dW_down = dYᵀ·act(u) with the activation (GELU erf/tanh, SwiGLU) rebuilt in the B prologue
matmul_tiles.py    the shared GEMM tile: grouped tile offsets, K-loop → fp32 accumulator, tile loads/stores, bias
matmul_configs.py  autotune configs for sm_80 / sm_90 (dual- and triple-GEMM lists too), one config when interpreting
rms_norm.py        RMSNorm forward (fp32 rstd, HF cast order) and backward (x̂ rebuilt, residual folded, y emitted)
swiglu.py          SwiGLU forward / backward pointwise      swiglu_math.py  SwiGLU / SwiGLU' jit helpers
rope.py            RoPE on q and k in one launch, and its adjoint (inverse=True)
linear_swiglu.py   gate and up GEMMs on one tile, SwiGLU epilogue (g, u never written)
swiglu_pointwise.py  dH GEMM with dg/du epilogue (pointwise policy)
swiglu_ffn_recompute.py  RMSNorm prologue → gate, up and dH = dY·W_down on one tile → h, dg, du (ffn/block recompute)
reduce.py          fp32 per-program partials → one column sum (norm dweight/dbias, ffn_recompute db1), owned row ranges
rows.py            row-kernel helpers: a program's row block, masked row loads/stores
rounding.py        nearest-even rounding to bf16/fp16 kept in fp32 (the interpreter's bf16 cast truncates)
flash_attention.py  flash attention forward, dq and dk/dv kernels     flash_attention_tiles.py  their sm_90 tile table
linear_cross_entropy.py  the LM head's forward and dz kernels (and its tile choice)
compile_check.py   sm_90 compile report: registers, spills, shared memory (compile_jobs_llama.py: the Llama jobs)
The launchers (graph-op signatures, argument checks, fallbacks, grids) are ckpt_ext/backends/triton/; nothing here
imports the rest of ckpt_ext (tests/test_imports.py).
"""

# The folder sits at the repository root, so from there ``import kernels`` finds it before the ``kernels`` distribution
# (Hugging Face's kernel hub, which transformers 5.x imports). Imported under that top-level name, this package hands
# the name over to the distribution when one is installed: it is looked up on sys.path without the repository root and
# put in sys.modules in place of this module (the import statement returns what sys.modules holds, so the importer
# gets the distribution, and its submodules resolve from its own __path__). Imported as ``ckpt_ext.kernels``
# (editable or regular install, or the in-tree link) nothing happens.
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec("kernels", [p for p in _sys.path if _os.path.abspath(p or ".") != _root])
    if _spec is not None and _spec.loader is not None:  # else no distribution: this import-free package stays
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)  # an error propagates (and the importer drops the name), as without us
