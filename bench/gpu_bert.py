"""A BERT-base-shaped transformers ``BertLayer`` per variant on one GPU, on a right-padded batch: parity, step time,
peak memory.

    python -m bench.gpu_bert [--device cuda|cpu]

Shape (cuda): d=768, 12 heads, d_ff=3072, B=32, T=512 (the seed's BERT-base batch), bf16 parameters and input, sdpa
attention, dropout 0 (cpu smoke mode: d=64, 4 heads, d_ff=96, B=4, T=16, fp32, interpreter). Padding: kept lengths T,
3T/4, T/2 and T/4 cycled over the batch (62.5% real tokens), handed to the layer as the additive (B, 1, 1, T) key mask
BertModel builds; the fused layers turn it into key ids, so the kernels skip padded key tiles. Variants, all sharing
one layer's parameters: HF layer, torch.utils.checkpoint over it (non-reentrant), HF gradient_checkpointing
(reentrant, as gradient_checkpointing_enable wraps it), ckpt_ext per post-LN policy (apply_fused_checkpointing,
triton backend) and ckpt_ext block under torch.compile(mode="reduce-overhead") (the mask checks are device
assertions there). DeepSpeed's fused BERT layer is not installed here, so it has no row. Per row: max |Δ| of the
output and of each gradient against the HF layer in fp32 (parity), step ms (forward + backward), ratio to the HF layer
and to torch checkpoint, peak memory over one step above parameters and input, and bytes kept after forward. Writes
gpu_bert.csv / .md.
"""

from __future__ import annotations

import copy

import torch

import ckpt_ext
from ckpt_ext.integrations.huggingface import apply_fused_checkpointing
from ckpt_ext.policies import POST_LN_POLICIES

from .gpu_common import cli_main, compare_variants, step_grads

KEPT = (1.0, 0.75, 0.5, 0.25)  # share of T kept per batch row, cycled


def _shape(device: str) -> dict:
    if device == "cuda":
        return dict(d=768, heads=12, ff=3072, b=32, t=512, dtype=torch.bfloat16)
    return dict(d=64, heads=4, ff=96, b=4, t=16, dtype=torch.float32)


def _layer_and_inputs(device: str, s: dict):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    cfg = BertConfig(hidden_size=s["d"], num_attention_heads=s["heads"], intermediate_size=s["ff"],
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = BertLayer(cfg).to(device=device, dtype=s["dtype"]).train()
    x = torch.randn(s["b"], s["t"], s["d"], device=device, dtype=s["dtype"])
    lengths = torch.tensor([int(s["t"] * KEPT[i % len(KEPT)]) for i in range(s["b"])], device=device)
    keep = torch.arange(s["t"], device=device)[None] < lengths[:, None]  # (B, T)
    mask = torch.zeros(s["b"], 1, 1, s["t"], device=device, dtype=s["dtype"])
    mask.masked_fill_(~keep[:, None, None], torch.finfo(s["dtype"]).min)  # (B, 1, 1, T), as BertModel builds it
    return layer, x, mask


def _call(layer, mask):
    def fn(x):
        out = layer(x, mask)
        return out[0] if isinstance(out, tuple) else out  # a 1-tuple in transformers 4.57, the tensor in 5.x

    return fn


def _variants(layer, mask, device: str) -> dict:
    from torch.utils.checkpoint import checkpoint

    call = _call(layer, mask)
    variants = {
        "HF BertLayer": call,
        "torch checkpoint": lambda x: checkpoint(call, x, use_reentrant=False),
        "HF gradient_checkpointing (reentrant)": lambda x: checkpoint(call, x, use_reentrant=True),
    }
    for policy in POST_LN_POLICIES:
        fused = copy.copy(layer)  # shares parameters and submodules; only the class is swapped
        apply_fused_checkpointing(fused, policy)
        variants[f"ckpt_ext {policy}"] = _call(fused, mask)
    if device == "cuda":  # CUDA graphs; the interpreter lane does not compile
        compiled = copy.copy(layer)
        apply_fused_checkpointing(compiled, "block")
        graphed = torch.compile(_call(compiled, mask), mode="reduce-overhead")
        variants["ckpt_ext block, compile reduce-overhead"] = graphed
    return variants


def run(device: str) -> list[dict]:
    s = _shape(device)
    layer, x, mask = _layer_and_inputs(device, s)
    grad = torch.randn_like(x)
    params = list(layer.parameters())
    ref_layer = copy.deepcopy(layer).float()
    ref = step_grads(_call(ref_layer, mask.float()), x.float(), grad.float(), list(ref_layer.parameters()))
    backend = "triton" if device == "cuda" else "reference"
    with ckpt_ext.set_backend(backend):
        return compare_variants(_variants(layer, mask, device), x, grad, params, ref, device,
                                {"vs_hf": "HF BertLayer", "vs_torch_ckpt": "torch checkpoint"})  # fmt: skip


def main(argv=None) -> int:
    return cli_main("gpu_bert", __doc__.splitlines()[0], run, "BERT-base BertLayer (right-padded batch) per variant",
                    argv)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
