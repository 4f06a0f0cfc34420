"""The segments a block is made of, each a forward, a backward and a declaration of what it can save:

    norm.py       norm1 / norm2: LayerNorm or RMSNorm with fp32 row statistics (offset and bias per spec)
    attention.py  q/k/v projections (+ q/k norm, RoPE), the attention core, o_proj + dropout + residual
    mlp.py        first linear(s) -> activation (ACTIVATIONS: GELU, GELU-tanh, SwiGLU, GeGLU) -> down projection
    lora_terms.py PEFT LoRA terms of any segment's linears
    common.py     autocast state and gradient helpers; dispatch.py: how segments call the ckpt_ext ops

functional.py runs them in the order the spec's placement gives and owns the autograd.Function; save_layout.py
combines their ``saves`` declarations with the policy table.
"""
