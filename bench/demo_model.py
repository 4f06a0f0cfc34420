"""The demo's models, small byte-level GPT and Llama-style LMs built from ckpt_ext blocks, and the checkpointing
strategies applied to them.

TinyGPT: token embedding (256 bytes) + learned positions -> n_layers TransformerBlocks (LayerNorm, GELU) -> final
LayerNorm -> LM head tied to the embedding.
TinyLlama: token embedding -> n_layers Llama-form TransformerBlocks (RMSNorm, SwiGLU with d_ff = 8/3·d rounded to 16,
GQA with half as many kv heads, RoPE tables computed once per forward as Hugging Face does) -> final RMSNorm -> tied
head.
TinyBERT: byte-level BERT-style masked LM: token embedding + learned positions -> LayerNorm -> n_layers post-LN,
bidirectional TransformerBlocks (norm_placement="post", causal=False: BERT's layer form, LayerNorm + GELU) -> head
tied to the embedding (the last block's output is already normalized). Its loss: 15% of the positions (drawn from a
generator seeded by the batch's bytes, so every strategy masks the same ones) are replaced by the byte 0 (MASK, absent
from the corpus) and predicted, cross entropy over those positions.
``make_strategy(base, name)`` deep-copies a model and applies one strategy, so every strategy starts from the same
weights.

| strategy        | what it does                                                                         | exact |
|-----------------|--------------------------------------------------------------------------------------|-------|
| none            | plain blocks, every activation kept                                                  | yes   |
| ckpt_every_k    | torch.utils.checkpoint(use_reentrant=False) around every k-th block (k = 1, 2, 4)    | yes   |
| fused_<policy>  | ckpt_ext.apply_checkpointing(model, policy) on every block (pointwise, ffn,          | yes   |
|                 | block_keep_attn, block)                                                              |       |
All strategies compute the same math (dropout is 0 in the demo), so their losses agree up to float rounding.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ckpt_ext import TransformerBlock, apply_checkpointing
from ckpt_ext.block import RMSNorm, init_block_

VOCAB = 256
STRATEGIES = ("none", "ckpt_every_4", "ckpt_every_2", "ckpt_every_1", "fused_pointwise", "fused_ffn",
              "fused_block_keep_attn", "fused_block")  # fmt: skip
FAMILIES = ("gpt", "llama", "bert")
MASK, MASK_RATE = 0, 0.15
LABELS = {
    "none": "No checkpointing",
    "ckpt_every_4": "torch ckpt, every 4th layer",
    "ckpt_every_2": "torch ckpt, every 2nd layer",
    "ckpt_every_1": "torch ckpt, every layer",
    "fused_pointwise": "ckpt_ext pointwise",
    "fused_ffn": "ckpt_ext ffn",
    "fused_block_keep_attn": "ckpt_ext block_keep_attn",
    "fused_block": "ckpt_ext block",
}


class CheckpointedBlock(nn.Module):
    """Runs ``block`` under torch.utils.checkpoint (non-reentrant): keeps only its input, re-runs it in backward."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return checkpoint(self.block, x, use_reentrant=False, **kwargs)


class TinyGPT(nn.Module):
    """Byte-level GPT: (B, T) int64 tokens -> (B, T, 256) logits."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, max_seq: int):
        super().__init__()
        self.max_seq = max_seq
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(max_seq, d_model)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=0.02)
        for block in self.blocks:
            init_block_(block, std=0.02, n_layers=n_layers)

    def forward(self, idx: Tensor) -> Tensor:
        b, t = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.t()  # (B, T, 256), head tied to the embedding

    def loss(self, batch: Tensor) -> Tensor:
        """Next-byte cross entropy on a (B, T + 1) window of the corpus."""
        logits = self(batch[:, :-1])  # (B, T, 256)
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


class TinyLlama(TinyGPT):
    """Byte-level Llama-style LM: (B, T) int64 tokens -> (B, T, 256) logits."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, max_seq: int, rope_theta: float = 10000.0):
        nn.Module.__init__(self)
        self.max_seq = max_seq
        self.tok = nn.Embedding(VOCAB, d_model)
        kv = max(n_heads // 2, 1)
        d_ff = 16 * round(8 * d_model / 3 / 16)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_heads, activation="swiglu", n_kv_heads=kv, d_ff=d_ff)
                                    for _ in range(n_layers))  # fmt: skip
        self.ln_f = RMSNorm(d_model, 1e-6)
        dh = d_model // n_heads
        self.register_buffer("inv_freq", rope_theta ** (-torch.arange(0, dh, 2, dtype=torch.float32) / dh), False)
        nn.init.normal_(self.tok.weight, std=0.02)
        for block in self.blocks:
            init_block_(block, std=0.02, n_layers=n_layers)

    def rope(self, t: int, device) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (1, T, head_dim): computed once per forward and shared by every layer."""
        angles = torch.arange(t, device=device, dtype=torch.float32)[:, None] * self.inv_freq  # (T, dh/2)
        angles = torch.cat([angles, angles], dim=-1)[None]
        return angles.cos(), angles.sin()

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx)  # (B, T, d)
        pe = self.rope(idx.shape[1], idx.device)
        for block in self.blocks:
            x = block(x, position_embeddings=pe)
        return self.ln_f(x) @ self.tok.weight.t()  # (B, T, 256)


class TinyBERT(TinyGPT):
    """Byte-level BERT-style masked LM: (B, T) int64 tokens -> (B, T, 256) logits."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, max_seq: int):
        nn.Module.__init__(self)
        self.max_seq = max_seq
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(max_seq, d_model)
        self.ln_e = nn.LayerNorm(d_model)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_heads, norm_placement="post", causal=False)
                                    for _ in range(n_layers))  # fmt: skip
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=0.02)
        for block in self.blocks:
            init_block_(block, std=0.02, n_layers=n_layers)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.ln_e(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)))  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return x @ self.tok.weight.t()  # (B, T, 256)

    def loss(self, batch: Tensor) -> Tensor:
        """Masked-byte cross entropy on the first T bytes of a (B, T + 1) window."""
        tokens = batch[:, :-1]  # (B, T)
        gen = torch.Generator().manual_seed(int(tokens.sum()))
        picked = (torch.rand(tokens.shape, generator=gen) < MASK_RATE).to(tokens.device)  # (B, T) bool
        picked[:, 0] |= ~picked.any(dim=1)  # at least one position per row
        logits = self(tokens.masked_fill(picked, MASK))  # (B, T, 256)
        return F.cross_entropy(logits[picked], tokens[picked])


def build(family: str, n_layers: int, d_model: int, n_heads: int, max_seq: int) -> TinyGPT:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    cls = {"gpt": TinyGPT, "llama": TinyLlama, "bert": TinyBERT}[family]
    return cls(n_layers, d_model, n_heads, max_seq)


def check_strategies(names: list[str]) -> list[str]:
    """Validate strategy names (``ckpt_every_<k>`` takes any k >= 1); raises ValueError naming the valid ones."""
    for name in names:
        if name not in STRATEGIES and not re.fullmatch(r"ckpt_every_[1-9][0-9]*", name):
            raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)} (or ckpt_every_<k>)")
    if len(set(names)) != len(names):
        raise ValueError(f"strategies repeat: {', '.join(names)}")
    return names


def label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    k = int(name.rsplit("_", 1)[1])
    suffix = "th" if k % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"torch ckpt, every {k}{suffix} layer"


def make_strategy(base: TinyGPT, name: str) -> TinyGPT:
    """A deep copy of ``base`` (same weights) with strategy ``name`` applied."""
    check_strategies([name])
    model = copy.deepcopy(base)
    if name.startswith("ckpt_every_"):
        every = int(name.rsplit("_", 1)[1])
        for i in range(every - 1, len(model.blocks), every):
            model.blocks[i] = CheckpointedBlock(model.blocks[i])
    elif name.startswith("fused_"):
        apply_checkpointing(model, policy=name[len("fused_") :], every=1)
    return model
