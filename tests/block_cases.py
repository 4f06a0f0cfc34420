"""One randomized block configuration ("case"), run through FusedCheckpointBlock and checked against the plain block.

A case is a plain dict (so hypothesis can draw it and @example / regression tests can spell it out):
    b, t            batch and sequence length (0 allowed)
    d, heads, head_dim (None: d // heads), kv (kv heads, Llama form), d_ff, activation, causal
    dtype           "float32" | "float64" | "bfloat16"
    mask            "none" | "bool" | "additive" | "-inf" | "finfo.min"; mask_shape "B1TT" | "BHTT" | "TT"
    padding         "none" | "left" | "right" | "rows" (random query rows with every key masked)
    policy, backend ("reference" | "cpp"), p (residual dropout), p_attn (attention dropout), seed
    strided         x is handed over non-contiguous: a (T, B, d) tensor transposed to (B, T, d)

Masks: "bool" is a keep-mask; "-inf" / "finfo.min" are additive float masks whose masked positions hold that value and
whose visible positions hold random finite biases; "additive" has only finite biases (masked positions -30), so every
key stays visible. A query row with no visible key (every key masked, causality included) has no defined output:
the checks zero the upstream gradient on such rows, compare outputs only on the other rows, and build the reference
with those rows unmasked (a row's own mask never reaches any other row's output, so all gradients stay comparable).

check_parity (no dropout): output, dx and every parameter gradient of the fused block against the plain block run in
the same dtype and in float64 (tolerance: 4 x torch's own error + a small floor), and nothing non-finite where the
plain block is finite; the bytes the fused forward retains equal the policy table's (policies.retained_bytes: no
private copy of a strided x, nothing beyond the table).
check_dropout_policies: with dropout the plain block draws other masks, so each policy is held to the tolerance rule
against policy "none" of the fused block under one seed (float64 run = the reference), and its retained bytes to the
table (seeded masks keep nothing).
"""

from __future__ import annotations

import copy

import torch

from ckpt_ext import FusedCheckpointBlock, TransformerBlock, set_backend
from ckpt_ext.block import init_block_
from ckpt_ext.measure import retained_activation_bytes
from ckpt_ext.policies import retained_bytes

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
FLOOR = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the tensor's scale


def build_block(case: dict) -> TransformerBlock:
    """The plain block in float64, initialized from case["seed"] with non-trivial norm weights."""
    torch.manual_seed(case["seed"])
    kw = dict(d_ff=case["d_ff"], activation=case["activation"], causal=case["causal"], dropout=case.get("p", 0.0),
              attn_dropout=case.get("p_attn", 0.0))  # fmt: skip
    if case.get("head_dim") is not None:
        kw["head_dim"] = case["head_dim"]
    if case["activation"] == "swiglu":
        kw["n_kv_heads"] = case.get("kv") or case["heads"]
    blk = TransformerBlock(case["d"], case["heads"], **kw).double()
    init_block_(blk, std=0.3)
    with torch.no_grad():
        for ln in (blk.ln_1, blk.ln_2):
            ln.weight.add_(0.2 * torch.randn_like(ln.weight))
    return blk


def inputs(case: dict, blk: TransformerBlock):
    """x (B, T, d) and upstream grad in float64, the float64 mask (or None), and visible (B, H, T, T) bool."""
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    b, t, h = case["b"], case["t"], case["heads"]
    x = torch.randn(b, t, case["d"], generator=gen, dtype=torch.float64)
    g = torch.randn(b, t, case["d"], generator=gen, dtype=torch.float64)
    nb = max(b, 1)  # a (T, T) mask is drawn for one batch row even when B = 0
    keep = torch.ones(nb, h, t, t, dtype=torch.bool)
    pad = case.get("padding", "none")
    if pad in ("left", "right"):
        lengths = torch.randint(0, t + 1, (nb,), generator=gen)
        for i, n in enumerate(lengths.tolist()):
            if pad == "right":
                keep[i, :, :, n:] = False
            else:
                keep[i, :, :, : t - n] = False
    elif pad == "rows":
        rows = torch.rand(nb, 1, t, generator=gen) < 0.4  # (B, 1, T) query rows with no key
        keep &= ~rows[..., None]
    shape = case.get("mask_shape", "B1TT")
    if shape == "B1TT":
        keep = keep[:, :1].expand(nb, h, t, t)  # padding does not depend on the head
    elif shape == "TT":
        keep = keep[:1, :1].expand(nb, h, t, t)
    kind = case.get("mask", "none")
    mask = None
    if kind == "bool":
        mask = keep
    elif kind != "none":
        bias = -2.0 * torch.rand(nb, h, t, t, generator=gen, dtype=torch.float64) + 0.5
        fill = {"additive": -30.0, "-inf": float("-inf"), "finfo.min": torch.finfo(DTYPES[case["dtype"]]).min}[kind]
        mask = bias.masked_fill(~keep, fill)
        if kind == "additive":
            keep = torch.ones_like(keep)
    if mask is not None:
        mask = {"B1TT": mask[:b, :1], "BHTT": mask[:b], "TT": mask[0, 0]}[shape].contiguous()
    visible = keep[:b].clone()
    if case["causal"]:
        visible &= torch.ones(t, t, dtype=torch.bool).tril()
    return x, g, mask, visible


def _in(mask, dtype):
    """A float mask in the input's dtype (SDPA wants them equal); bool masks and None as they are."""
    return mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)


def _repaired(mask, empty_rows):
    """The mask with every row that has no visible key opened up (full (B, H, T, T) shape)."""
    if mask is None or not bool(empty_rows.any()):
        return mask
    b, h, t = empty_rows.shape
    full = mask.expand(b, h, t, t).clone()
    full[empty_rows] = True if full.dtype == torch.bool else 0.0
    return full


def strided(x: torch.Tensor) -> torch.Tensor:
    """x's values as a non-contiguous (B, T, d) tensor: a (T, B, d) one transposed (not viewable as (B·T, d))."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def run(block, x, g, mask, seed=None, layout=None):
    """(out, dx, parameter grads in named_parameters order), with the global RNG seeded first if ``seed``; x handed
    over through ``layout`` (e.g. strided) if given."""
    x = x.detach().clone()
    x = (x if layout is None else layout(x)).requires_grad_(True)
    block.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    out = block(x, attn_mask=mask)
    out.backward(g.to(out.dtype))
    return [out.detach(), x.grad] + [p.grad for _, p in block.named_parameters()]


def _names(block):
    return ["out", "dx"] + [n for n, _ in block.named_parameters()]


def floor(case: dict) -> float:
    """FLOOR of the case's dtype; the Llama form's RMSNorm computes in float32 (Hugging Face's cast order) even for
    float64 inputs, in both blocks, so float64 there is held to float32's floor."""
    dtype = DTYPES[case["dtype"]]
    return max(FLOOR[dtype], FLOOR[torch.float32]) if case["activation"] == "swiglu" else FLOOR[dtype]


def assert_close_rule(ours, ref_same, ref64, rel_floor, names, what):
    """|ours - ref64| <= 4 max|ref_same - ref64| + rel_floor (1 + max|ref64|), per tensor; None grads pair up."""
    for name, a, b, r in zip(names, ours, ref_same, ref64):
        assert (a is None) == (r is None), f"{what}: {name}: gradient presence differs"
        if a is None:
            continue
        assert a.shape == r.shape, f"{what}: {name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        if r.numel() == 0:
            continue
        torch_err = (b.double() - r).abs().max().item()
        tol = 4.0 * torch_err + rel_floor * (1.0 + r.abs().max().item())
        err = (a.double() - r).abs().max().item()
        assert err <= tol, f"{what}: {name}: max error {err:.3g} > {tol:.3g} (torch's own {torch_err:.3g})"


def assert_finite_where(ours, plain, names, what):
    for name, a, p in zip(names, ours, plain):
        if a is not None and p is not None:
            bad = torch.isfinite(p) & ~torch.isfinite(a)
            assert not bool(bad.any()), (
                f"{what}: {name}: {int(bad.sum())} non-finite values where the plain block is finite"
            )


def check_parity(case: dict) -> None:
    dtype = DTYPES[case["dtype"]]
    blk64 = build_block(case)
    x, g, mask, visible = inputs(case, blk64)
    empty = ~visible.any(-1)  # (B, H, T) rows with no visible key
    bad_rows = empty.any(1)  # (B, T)
    g = g.masked_fill(bad_rows[..., None], 0.0)
    fixed = _repaired(mask, empty)
    blk = copy.deepcopy(blk64).to(dtype)
    what = f"case {case}"
    ref64 = run(blk64, x, g, fixed)
    ref = run(blk, x.to(dtype), g, _in(fixed, dtype))
    with torch.no_grad():
        plain_out = blk(x.to(dtype), attn_mask=_in(mask, dtype))
    fused = FusedCheckpointBlock.from_block(copy.deepcopy(blk), policy=case["policy"])
    layout = strided if case.get("strided") else None
    with set_backend(case["backend"]):
        ours = run(fused, x.to(dtype), g, _in(mask, dtype), layout=layout)
        check_retained(case, fused, x.to(dtype), _in(mask, dtype), layout)
    names = _names(blk)
    for tensors in (ours, ref, ref64):
        tensors[0] = tensors[0].masked_fill(bad_rows[..., None], 0.0)
    assert_finite_where([ours[0]], [plain_out.masked_fill(bad_rows[..., None], 0.0)], ["out"], what)
    assert_finite_where(ours, ref, names, what)
    assert_close_rule(ours, ref, ref64, floor(case), names, what)


def table_bytes(case: dict, b: int, t: int) -> int:
    """policies.retained_bytes for the case's block at (b, t): every tensor in the case's dtype, statistics fp32
    (float64 in a float64 block)."""
    size = DTYPES[case["dtype"]].itemsize
    llama = case["activation"] == "swiglu"
    return retained_bytes(case["policy"], b, t, case["d"], case["heads"], case["d_ff"], act_bytes=size,
                          matmul_bytes=size, stat_bytes=max(size, 4), n_kv_heads=case.get("kv") if llama else None,
                          head_dim=case.get("head_dim"), norm="rmsnorm" if llama else "layernorm",
                          mlp="swiglu" if llama else "gelu")  # fmt: skip


def check_retained(case: dict, fused, x, mask, layout) -> None:
    """The bytes the fused forward keeps for backward (measure.retained_activation_bytes) are the policy table's."""
    x = x.detach().clone()
    x = (x if layout is None else layout(x)).requires_grad_(True)
    kept, _ = retained_activation_bytes(fused, x, attn_mask=mask)
    want = table_bytes(case, *x.shape[:2])
    assert kept == want, f"case {case}: the forward retains {kept} bytes, the policy table says {want}"


def check_dropout_policies(case: dict) -> None:
    """Each policy under one seed against policy "none" (float64 reference run of the same fused block)."""
    dtype = DTYPES[case["dtype"]]
    blk64 = build_block(case).train()
    x, g, mask, visible = inputs(case, blk64)
    empty = ~visible.any(-1)
    bad_rows = empty.any(1)
    g = g.masked_fill(bad_rows[..., None], 0.0)
    what = f"case {case}"
    m = _in(mask, dtype)
    step = case["seed"] + 7
    with set_backend("reference"):
        ref64 = run(FusedCheckpointBlock.from_block(copy.deepcopy(blk64), policy="none"), x, g, mask, seed=step)
    blk = copy.deepcopy(blk64).to(dtype)
    fused = FusedCheckpointBlock.from_block(copy.deepcopy(blk), policy=case["policy"])
    layout = strided if case.get("strided") else None
    with set_backend(case["backend"]):
        ref = run(FusedCheckpointBlock.from_block(copy.deepcopy(blk), policy="none"), x.to(dtype), g, m, seed=step)
        ours = run(fused, x.to(dtype), g, m, seed=step, layout=layout)
        check_retained(case, fused, x.to(dtype), m, layout)
    names = _names(blk)
    for tensors in (ours, ref, ref64):
        tensors[0] = tensors[0].masked_fill(bad_rows[..., None], 0.0)
    for name, a in zip(names, ours):
        assert a is None or bool(torch.isfinite(a).all()), f"{what}: {name}: non-finite values"
    assert_close_rule(ours, ref, ref64, floor(case), names, what)
