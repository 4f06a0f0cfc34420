"""A Llama-3-8B-shaped transformers ``LlamaDecoderLayer`` per variant on one GPU: parity, step time, peak memory.

    python -m bench.gpu_llama [--device cuda|cpu]

Shape (cuda): d=4096, 32 query / 8 kv heads, d_ff=14336, B=1, T=4096, bf16 parameters and input, sdpa attention, RoPE
tables from the model's own rotary embedding (cpu smoke mode: d=64, 4/2 heads, d_ff=96, B=2, T=16, fp32, interpreter).
Variants, all sharing one layer's parameters: HF eager, torch.utils.checkpoint over it (non-reentrant), HF
gradient_checkpointing (reentrant, as gradient_checkpointing_enable wraps it), Liger-Kernel's patched layer (RMSNorm,
SwiGLU, RoPE kernels; when liger-kernel imports), ckpt_ext per policy (apply_fused_checkpointing, triton backend) and
ckpt_ext block under torch.compile(mode="reduce-overhead") (CUDA graphs; dropout-free, so no seed is captured).
Per row: max |Δ| of the output and of each gradient against HF eager in fp32 (parity), step ms (forward + backward),
ratio to HF eager and to torch checkpoint, peak memory over one step above parameters and input, and bytes kept after
forward. Writes gpu_llama.csv / .md and gpu_llama.png (step time vs kept memory).
"""

from __future__ import annotations

import copy

import torch

import ckpt_ext
from ckpt_ext.integrations.huggingface import apply_fused_checkpointing

from .gpu_common import cli_main, compare_variants, out_dir, step_grads

POLICIES = ("none", "pointwise", "ffn", "block_keep_attn", "block")


def _shape(device: str) -> dict:
    if device == "cuda":
        return dict(d=4096, heads=32, kv=8, ff=14336, b=1, t=4096, dtype=torch.bfloat16)
    return dict(d=64, heads=4, kv=2, ff=96, b=2, t=16, dtype=torch.float32)


def _layer_and_inputs(device: str, s: dict):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=s["d"], intermediate_size=s["ff"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv"], num_hidden_layers=1, max_position_embeddings=s["t"])  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).to(device=device, dtype=s["dtype"]).train()
    x = torch.randn(s["b"], s["t"], s["d"], device=device, dtype=s["dtype"])
    pos = torch.arange(s["t"], device=device)[None].expand(s["b"], -1)
    pe = LlamaRotaryEmbedding(cfg).to(device)(x, pos)
    return cfg, layer, x, pe


def _variants(layer, cfg, pe) -> dict:
    from torch.utils.checkpoint import checkpoint

    def call(m):
        return lambda x: m(x, position_embeddings=pe)

    variants = {
        "HF eager": call(layer),
        "torch checkpoint": lambda x: checkpoint(call(layer), x, use_reentrant=False),
        "HF gradient_checkpointing (reentrant)": lambda x: checkpoint(call(layer), x, use_reentrant=True),
    }
    liger = _liger_layer(layer, cfg)
    if liger is not None:
        variants["Liger-Kernel layer"] = call(liger)
    for policy in POLICIES:
        fused = copy.copy(layer)  # shares parameters and submodules; only the class is swapped
        apply_fused_checkpointing(fused, policy)
        variants[f"ckpt_ext {policy}"] = call(fused)
    compiled = copy.copy(layer)
    apply_fused_checkpointing(compiled, "block")
    variants["ckpt_ext block, compile reduce-overhead"] = torch.compile(call(compiled), mode="reduce-overhead")
    return variants


def _liger_layer(layer, cfg):
    """The same layer built after Liger's patch of modeling_llama (its RMSNorm, SwiGLU MLP, RoPE), same weights."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        return None
    from transformers.models.llama import modeling_llama

    saved = {k: getattr(modeling_llama, k) for k in ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb")}
    try:
        apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)  # fmt: skip
        liger = modeling_llama.LlamaDecoderLayer(cfg, 0).to(next(layer.parameters()))
        liger.load_state_dict(layer.state_dict())
        return liger.train()
    finally:
        for k, v in saved.items():
            setattr(modeling_llama, k, v)


def run(device: str) -> list[dict]:
    s = _shape(device)
    cfg, layer, x, pe = _layer_and_inputs(device, s)
    grad = torch.randn_like(x)
    params = list(layer.parameters())
    ref_layer = copy.deepcopy(layer).float()
    ref = step_grads(lambda x: ref_layer(x, position_embeddings=tuple(c.float() for c in pe)), x.float(), grad.float(),
                     list(ref_layer.parameters()))  # fmt: skip
    backend = "triton" if device == "cuda" else "reference"
    with ckpt_ext.set_backend(backend):
        rows = compare_variants(_variants(layer, cfg, pe), x, grad, params, ref, device,
                                {"vs_hf_eager": "HF eager", "vs_torch_ckpt": "torch checkpoint"})  # fmt: skip
    _plot(rows)
    return rows


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["kept_mib"], r["step_ms"])
        ax.annotate(r["variant"], (r["kept_mib"], r["step_ms"]), fontsize=7)
    ax.set_xlabel("activation memory kept after forward (MiB)")
    ax.set_ylabel("step ms (forward + backward)")
    ax.set_title("Llama-3-8B-shaped LlamaDecoderLayer, one step")
    fig.tight_layout()
    fig.savefig(out_dir() / "gpu_llama.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    return cli_main("gpu_llama", __doc__.splitlines()[0], run, "Llama-3-8B LlamaDecoderLayer per variant", argv)


if __name__ == "__main__":
    raise SystemExit(main())
