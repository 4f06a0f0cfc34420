"""Triton kernels of the ``triton`` backend (installed as ``ckpt_ext.kernels``; importing this package imports nothing).

layer_norm.py      LayerNorm forward (fp32 mean/rstd) and backward (x̂ rebuilt, residual folded, fp32 dγ/dβ partials)
pointwise.py       bias + GELU, GELU backward from u            gelu_math.py   GELU / GELU' jit helpers (both forms)
dropout.py         hash-mask dropout + residual add (bit-exact with the reference mask)
ffn_recompute.py   FC1 (LN2 prologue) + dA = dY·W2 on one tile → GELU, GELU'·dA, db1 partials (ffn/block recompute)
linear_gelu.py     FC1 forward with bias + GELU epilogue (ffn/block forward, u never written)
linear_dropout_add.py  projection / FC2 GEMM with bias + hash dropout + residual epilogue (output never written)
ffn_pointwise.py   dA GEMM with GELU' epilogue, dW2 GEMM with GELU prologue (pointwise policy)
matmul_configs.py  autotune configs for sm_80 / sm_90 (dual-GEMM lists too), one config under the interpreter
launchers.py       IMPLS: graph-op signatures on top of the kernels      compile_check.py  sm_90 compile report
"""
