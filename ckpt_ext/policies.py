"""The recompute policies: for each, what the forward keeps for backward and what backward rebuilds. One table.

The block's autograd.Function (functional.py) saves exactly ``POLICIES[name].keeps`` and nothing else, the retained-
memory tests check measured bytes against ``retained_bytes()`` computed from this table, and bench/roofline and the
planner price the same table. One block covers both families: GPT-2/ViT (LayerNorm, GELU, packed q|k|v) and the Llama
family (RMSNorm, SwiGLU, RoPE, GQA, Qwen3's per-head q/k norm). Tensor names (N = B*T rows, d = width, H = MLP hidden,
h = query heads, hk = kv heads, dh = head_dim; q width h·dh, k and v width hk·dh):

| name        | shape                  | what                                                                    |
|-------------|------------------------|-------------------------------------------------------------------------|
| x           | (N, d)                 | block input (not counted: the caller owns it)                           |
| ln1_stats   | 2 or 1 x (N,)          | fp32 statistics of norm 1: LayerNorm mean and rstd, RMSNorm rstd        |
| ln1_out     | (N, d)                 | norm1(x)                                                                |
| qkv         | (N, (h + 2hk)·dh)      | what attention reads: q, k (after q/k norm and RoPE), v — with q/k norm |
|             |                        | the projections before the norm instead (q, k rebuilt in backward)      |
| qk_stats    | (N·h,), (N·hk,)        | fp32 rstd of Qwen3's per-head q/k norm (only with qk_norm)              |
| qk_rope     | (N, (h + hk)·dh)       | normalized, rotated q and k (only with qk_norm)                         |
| attn_out    | (N, h·dh)              | attention output (o_proj input)                                         |
| attn_lse    | (B, h, T)              | fp32 log-sum-exp rows of the softmax                                    |
| x1          | (N, d)                 | residual stream after attention                                         |
| ln2_stats   | 2 or 1 x (N,)          | fp32 statistics of norm 2                                               |
| ln2_out     | (N, d)                 | norm2(x1)                                                               |
| fc1_out     | (N, H) GELU / 2(N, H)  | GELU: u, the pre-activation; SwiGLU: g and u (gate and up outputs)      |
| act_out     | (N, H)                 | gelu(u) or silu(g)·u: the down projection's input                       |

| policy          | keeps (beyond x)                               | rebuilt inside backward kernels                  |
|-----------------|------------------------------------------------|--------------------------------------------------|
| none            | everything above                               | nothing                                          |
| pointwise       | ln*_stats, qkv, qk_stats, attn_out, attn_lse,  | norm outputs (norm backward), act_out (dW_down   |
|                 | x1, fc1_out                                    | prologue), act' (dA/dH epilogue), qk_rope        |
| ffn             | ln*_stats, qkv, qk_stats, attn_out, attn_lse,  | + fc1_out, act_out in one kernel (norm2 → FC1 or |
|                 | x1                                             | gate/up → activation, beside dA = dY·W_down)     |
| block_keep_attn | ln*_stats, attn_out, attn_lse                  | + norm1 → q/k/v (q/k norm, RoPE), o_proj +       |
|                 |                                                | residual → x1; never the attention forward       |
| block           | ln*_stats                                      | + the attention half (norm1, q/k/v, attention)   |
The MLP's last matmul (FC2 / down_proj) output is never kept nor recomputed: backward does not need it.
``block_keep_attn`` (long context) keeps the attention core's output and lse, so backward never re-runs the T²
attention forward; the rest of the block is rebuilt as ``block`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ALL_TENSORS = (
    "x",
    "ln1_stats",
    "ln1_out",
    "qkv",
    "qk_stats",
    "qk_rope",
    "attn_out",
    "attn_lse",
    "x1",
    "ln2_stats",
    "ln2_out",
    "fc1_out",
    "act_out",
    "h1",
    "h2",
)
_ATTN_SIDE = ("qkv", "qk_stats", "attn_out", "attn_lse", "x1")


@dataclass(frozen=True)
class Policy:
    name: str
    keeps: tuple[str, ...]
    extra_matmuls: str  # extra matmul work done in backward, for docs and reports

    @property
    def rebuilds(self) -> tuple[str, ...]:
        return tuple(t for t in ALL_TENSORS if t not in self.keeps)


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("none", tuple(t for t in ALL_TENSORS if t not in ("h1", "h2")), "none"),
        Policy("pointwise", ("x", "ln1_stats", *_ATTN_SIDE, "ln2_stats", "fc1_out"), "none"),
        Policy("ffn", ("x", "ln1_stats", *_ATTN_SIDE, "ln2_stats"), "FC1 (or gate and up) once"),
        Policy(
            "block_keep_attn",
            ("x", "ln1_stats", "attn_out", "attn_lse", "ln2_stats"),
            "QKV, proj, FC1 (or gate and up); no attention forward",
        ),  # fmt: skip
        Policy("block", ("x", "ln1_stats", "ln2_stats"), "QKV, attention forward, proj, FC1 (or gate and up)"),
    )
}


# Post-LN (BERT): h1 = x + drop(attn(x) Wo + bo), x1 = norm1(h1), h2 = x1 + drop(MLP(x1)), out = norm2(h2). The
# MLP's input norm is norm1 (of h1), so ffn / block rebuild norm1 → FC1 with the pre-LN kernels; x1 is rebuilt by
# norm1's backward (emit) where dW_fc needs it; norm2's backward reads the pre-norm sum h2 — or, where γ2 allows
# (block_parts/norm.invertible: fp32 outputs, no tiny |γ|), rebuilds x̂2 = (out - β)/γ from the block's output, which
# the caller keeps anyway (the next block's input): then h2 is not kept (retained_bytes(..., ln2_from_out=True)).
# Rebuilding h2 otherwise would need the MLP's last matmul, which no policy recomputes.
_POST_ATTN_SIDE = ("qkv", "attn_out", "attn_lse", "h1", "ln1_stats")
POST_LN_POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("none", ("x", *_POST_ATTN_SIDE, "x1", "fc1_out", "act_out", "h2", "ln2_stats"), "none"),
        Policy("pointwise", ("x", *_POST_ATTN_SIDE, "fc1_out", "h2", "ln2_stats"), "none"),
        Policy("ffn", ("x", *_POST_ATTN_SIDE, "h2", "ln2_stats"), "FC1 (or gate and up) once"),
        Policy(
            "block_keep_attn",
            ("x", "attn_out", "attn_lse", "ln1_stats", "h2", "ln2_stats"),
            "QKV, proj, FC1 (or gate and up); no attention forward",
        ),  # fmt: skip
        Policy("block", ("x", "ln1_stats", "h2", "ln2_stats"), "QKV, attention forward, proj, FC1 (or gate and up)"),
    )
}
_TABLES = {"pre": POLICIES, "post": POST_LN_POLICIES}


def get_policy(name: str, placement: str = "pre") -> Policy:
    """The policy ``name`` of the pre-LN or post-LN table."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    if placement not in _TABLES:
        raise ValueError(f"placement must be 'pre' or 'post', got {placement!r}")
    return _TABLES[placement][name]


def tensor_bytes(
    name: str,
    batch: int,
    seq: int,
    d_model: int,
    n_heads: int,
    hidden: int,
    act_bytes: int = 4,
    matmul_bytes: int = 4,
    stat_bytes: int = 4,
    *,
    n_kv_heads: Optional[int] = None,
    head_dim: Optional[int] = None,
    norm: str = "layernorm",
    mlp: str = "gelu",
    qk_norm: bool = False,
    attn_norm: bool = True,
) -> int:
    """Bytes of one named tensor of the table (0 for a tensor this configuration does not have).

    act = norm/residual dtype, matmul = matmul output dtype (autocast), stat = statistics (fp32). Defaults describe
    the GPT-2 block (LayerNorm, GELU, n_kv_heads = n_heads, head_dim = d_model / n_heads)."""
    n = batch * seq
    kv = n_heads if n_kv_heads is None else n_kv_heads
    dh = d_model // n_heads if head_dim is None else head_dim
    n_stats = 2 if norm == "layernorm" else 1
    q_width, kv_width = n_heads * dh, kv * dh
    sizes = {
        "x": n * d_model * act_bytes,
        "ln1_stats": n_stats * n * stat_bytes if attn_norm else 0,
        "ln1_out": n * d_model * act_bytes if attn_norm else 0,
        "qkv": n * (q_width + 2 * kv_width) * matmul_bytes,
        "qk_stats": n * (n_heads + kv) * stat_bytes if qk_norm else 0,
        "qk_rope": n * (q_width + kv_width) * matmul_bytes if qk_norm else 0,
        "attn_out": n * q_width * matmul_bytes,
        "attn_lse": batch * n_heads * seq * stat_bytes,
        "x1": n * d_model * act_bytes,
        "ln2_stats": n_stats * n * stat_bytes,
        "ln2_out": n * d_model * act_bytes,
        "fc1_out": (2 if mlp in ("swiglu", "geglu", "geglu_erf") else 1) * n * hidden * matmul_bytes,
        "act_out": n * hidden * matmul_bytes,
        "h1": n * d_model * act_bytes,
        "h2": n * d_model * act_bytes,
    }
    return sizes[name]


def retained_bytes(policy: str, batch: int, seq: int, d_model: int, n_heads: int, hidden: int, **sizes) -> int:
    """Activation bytes one block keeps for backward beyond its input x, from the table above.

    ``sizes``: act_bytes, matmul_bytes, stat_bytes, the shape keywords of tensor_bytes (n_kv_heads, head_dim,
    norm, mlp, qk_norm), ``placement`` ("pre" or "post": which table) and ``ln2_from_out`` (post-LN: norm2's backward
    rebuilds x̂ from the block's output, which the caller owns, so h2 is not kept)."""
    keeps = get_policy(policy, sizes.pop("placement", "pre")).keeps
    if sizes.pop("ln2_from_out", False):
        keeps = tuple(t for t in keeps if t != "h2")
    return sum(tensor_bytes(t, batch, seq, d_model, n_heads, hidden, **sizes) for t in keeps if t != "x")
