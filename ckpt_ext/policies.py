"""The recompute policies: for each, what the forward keeps for backward and what backward rebuilds. One table.

The block's autograd.Function (functional.py) saves exactly ``POLICIES[name].keeps`` and nothing else, the retained-
memory test checks measured bytes against ``retained_bytes()`` computed from this table, and bench/roofline and the
planner price the same table. Tensor names (N = B*T rows, d = width, H = FFN hidden, h = heads):

| name        | shape       | what                                      |
|-------------|-------------|-------------------------------------------|
| x           | (N, d)      | block input (not counted: the caller owns it) |
| ln1_stats   | 2 x (N,)    | fp32 mean and rstd of LN1                  |
| ln1_out     | (N, d)      | LN1(x)                                    |
| qkv         | (N, 3d)     | packed q|k|v projection                   |
| attn_out    | (N, d)      | attention output (proj input)             |
| attn_lse    | (B, h, T)   | fp32 log-sum-exp rows of the softmax       |
| x1          | (N, d)      | residual stream after attention           |
| ln2_stats   | 2 x (N,)    | fp32 mean and rstd of LN2                  |
| ln2_out     | (N, d)      | LN2(x1)                                   |
| fc1_out     | (N, H)      | u, FFN pre-activation                     |
| gelu_out    | (N, H)      | a = gelu(u)                               |

| policy    | keeps (beyond x)                                | rebuilt inside backward kernels                        |
|-----------|-------------------------------------------------|--------------------------------------------------------|
| none      | everything above                                | nothing                                                |
| pointwise | ln*_stats, qkv, attn_out, attn_lse, x1, fc1_out | ln*_out (LN backward), gelu_out (dW2 prologue), gelu'  |
| ffn       | ln*_stats, qkv, attn_out, attn_lse, x1          | + fc1_out, gelu_out in one kernel (LN2 → FC1 → GELU)   |
| block     | ln*_stats                                       | + the attention half (ln1_out, qkv, attention, x1)     |
FC2's output is never kept nor recomputed: backward does not need it.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_TENSORS = (
    "x",
    "ln1_stats",
    "ln1_out",
    "qkv",
    "attn_out",
    "attn_lse",
    "x1",
    "ln2_stats",
    "ln2_out",
    "fc1_out",
    "gelu_out",
)


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
        Policy("none", ALL_TENSORS, "none"),
        Policy("pointwise", ("x", "ln1_stats", "qkv", "attn_out", "attn_lse", "x1", "ln2_stats", "fc1_out"), "none"),
        Policy("ffn", ("x", "ln1_stats", "qkv", "attn_out", "attn_lse", "x1", "ln2_stats"), "FC1 once"),
        Policy("block", ("x", "ln1_stats", "ln2_stats"), "QKV, attention forward, proj, FC1"),
    )
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


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
) -> int:
    """Bytes of one named tensor of the table. act = LN/residual dtype, matmul = matmul output dtype (autocast)."""
    n = batch * seq
    sizes = {
        "x": n * d_model * act_bytes,
        "ln1_stats": 2 * n * stat_bytes,
        "ln1_out": n * d_model * act_bytes,
        "qkv": 3 * n * d_model * matmul_bytes,
        "attn_out": n * d_model * matmul_bytes,
        "attn_lse": batch * n_heads * seq * stat_bytes,
        "x1": n * d_model * act_bytes,
        "ln2_stats": 2 * n * stat_bytes,
        "ln2_out": n * d_model * act_bytes,
        "fc1_out": n * hidden * matmul_bytes,
        "gelu_out": n * hidden * matmul_bytes,
    }
    return sizes[name]


def retained_bytes(policy: str, batch: int, seq: int, d_model: int, n_heads: int, hidden: int, **dtype_bytes) -> int:
    """Activation bytes one block keeps for backward beyond its input x, from the table above."""
    keeps = get_policy(policy).keeps
    return sum(tensor_bytes(t, batch, seq, d_model, n_heads, hidden, **dtype_bytes) for t in keeps if t != "x")
