"""Structure of the roofline cost model (ckpt_ext.roofline) at small shapes: what each variant recomputes and keeps
(retained memory checked against the bytes autograd saves during a real CPU forward)."""

from __future__ import annotations

import pytest
import torch

from ckpt_ext import FusedCheckpointBlock, TransformerBlock, roofline, set_backend

SHAPE = (64, 32, 2, 4)  # d_model, seq, batch, heads


def _trace(variant, dtype=torch.bfloat16):
    return roofline.step_trace(variant, *SHAPE, dtype=dtype)


def _names(variant, phase=None):
    return [op.name for op in _trace(variant).ops if phase is None or op.phase == phase]


def test_pricing_is_max_of_compute_and_memory_plus_launch():
    assert roofline.price(0, 0) == roofline.LAUNCH_S
    assert roofline.price(788e12, 0) == pytest.approx(1.0 + roofline.LAUNCH_S)
    assert roofline.price(788e12, 4.3e12 * 2) == pytest.approx(2.0 + roofline.LAUNCH_S)
    for op in _trace("eager").ops:
        assert op.seconds == pytest.approx(roofline.price(op.flops, op.bytes))


def test_views_and_metadata_cost_nothing():
    names = set(_names("eager")) | set(_names("block"))
    for free in ("aten::view", "aten::t", "aten::transpose", "aten::detach", "aten::_unsafe_view", "prim::device"):
        assert free not in names


def test_ckpt_ext_ops_are_one_kernel_each():
    fwd, bwd = _names("ffn", "forward"), _names("ffn", "backward")
    assert fwd.count("ckpt_ext::layer_norm_fwd") == 2 and fwd.count("ckpt_ext::gqa_attention_fwd") == 1
    assert bwd.count("ckpt_ext::ffn_recompute") == 1 and bwd.count("ckpt_ext::layer_norm_bwd") == 2
    assert not any(n.startswith("aten::native_layer_norm") for n in fwd + bwd)
    assert "ckpt_ext::linear_gelu_bwd" in _names("pointwise", "backward")


def test_torch_checkpointing_costs_more_than_eager():
    eager, ckpt, reentrant = (roofline.step_time(v, *SHAPE) for v in ("eager", "checkpoint", "checkpoint_reentrant"))
    assert eager < ckpt < reentrant  # non-reentrant stops early: its last matmul is not recomputed
    assert roofline.overhead("checkpoint", *SHAPE) == pytest.approx(ckpt / eager - 1.0)
    assert roofline.overhead("eager", *SHAPE, baseline="checkpoint") < 0


def test_extra_flops_per_policy():
    flops = {v: _trace(v).flops for v in roofline.VARIANTS}
    d, t, b, _ = SHAPE
    fc1 = 2 * b * t * d * 4 * d
    assert flops["none"] == flops["pointwise"] == flops["eager"]  # no matmul recomputed
    assert flops["ffn"] == flops["eager"] + fc1  # FC1 once
    assert flops["eager"] < flops["block"] <= flops["checkpoint"] < flops["checkpoint_reentrant"]
    assert flops["selective"] == flops["eager"]


def saved_bytes(block, x) -> int:
    """Bytes of the distinct storages autograd saves during a real forward of ``block`` (saved_tensors_hooks),
    the input's and the parameters' storages excluded."""
    seen: dict[int, int] = {}
    owned = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in block.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return sum(seen.values())


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize(
    "dtype, kwargs",
    [(torch.bfloat16, {}), (torch.float32, {}), (torch.float32, dict(activation="swiglu", n_kv_heads=2, d_ff=72))],
)
def test_retained_memory_equals_bytes_saved_by_a_real_forward(backend, dtype, kwargs):
    """roofline.retained_memory (the policy table for ckpt_ext policies, the traced storages for eager) against what
    autograd really saves when the block runs forward on CPU, per variant."""
    d, t, b, h = SHAPE
    x = torch.randn(b, t, d, dtype=dtype, requires_grad=True)
    with set_backend(backend):
        for variant in ("eager", *roofline.POLICY_VARIANTS):
            plain = TransformerBlock(d, h, **kwargs).to(dtype)
            block = plain if variant == "eager" else FusedCheckpointBlock.from_block(plain, policy=variant)
            measured = saved_bytes(block, x)
            assert roofline.retained_memory(variant, *SHAPE, dtype=dtype, **kwargs) == measured, variant


def test_retained_memory_orders_the_variants():
    d, t, b, h = SHAPE
    kept = {v: roofline.retained_memory(v, *SHAPE) for v in roofline.VARIANTS}
    assert kept["checkpoint"] == kept["checkpoint_reentrant"] == 0
    assert kept["none"] > kept["pointwise"] > kept["ffn"] > kept["block"]
    assert kept["block"] <= 0.25 * b * t * d * 2
    assert kept["selective"] < kept["eager"]


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        roofline.step_time("nope", *SHAPE)


def test_cli_prints_the_table(capsys):
    from bench import roofline as cli

    table = cli.rows(shapes=(SHAPE,))
    text = cli.markdown(table, shapes=(SHAPE,))
    assert text.count("\n") == len(roofline.VARIANTS) + 1
    assert "ckpt_ext block" in text and "torch checkpoint (reentrant)" in text
    assert "target" in cli.target_report(table, shapes=(SHAPE,))


@pytest.mark.parametrize("condition", [{"attn_dropout": 0.1}, {"padding": True}])
def test_attention_dropout_and_padding_are_priced_as_fused_kernels(condition):
    """With attention dropout or a padding mask no variant writes a (B, h, T, T) tensor (eager SDPA is priced as the
    GPU's fused kernel, ckpt_ext's attention ops are fused), every variant still runs, and the policies keep their
    ordering against torch checkpoint; dropout adds no kernel to ckpt_ext's block (the mask is hashed in-kernel) and
    a mask is read by the attention ops themselves."""
    d, t, b, h = long = (32, 128, 1, 4)  # T² terms dominate: a (B, h, T, T) bf16 tensor is 4x the (T, 4d) MLP one
    scores = b * h * t * t * 2
    for variant in roofline.VARIANTS:
        trace = roofline.step_trace(variant, *long, **condition)
        worst = max(op.bytes for op in trace.ops)
        assert worst < scores, (variant, worst)
    d, t, b, h = SHAPE
    base = {v: roofline.step_time(v, *SHAPE, **condition) for v in ("eager", "checkpoint", "block")}
    assert base["eager"] < base["checkpoint"] and base["block"] < base["checkpoint"]
    if "attn_dropout" in condition:
        dropped = [op.name for op in roofline.step_trace("block", *SHAPE, **condition).ops]
        assert dropped == ["aten::randint"] + _names("block")  # the host seed draw, then the very same kernels
    else:
        mask_reads = [op for op in roofline.step_trace("block", *SHAPE, **condition).ops
                      if op.name.startswith("ckpt_ext::gqa_attention")]  # fmt: skip
        plain = {op.name: op.bytes for op in _trace("block").ops if op.name.startswith("ckpt_ext::gqa_attention")}
        assert all(op.bytes >= plain[op.name] + b * t * t for op in mask_reads)  # each reads the (B, 1, T, T) mask


def test_attention_table_cli():
    from bench import roofline as cli

    text = cli.attention_rows(shape=SHAPE)
    assert text.count("\n") == len(roofline.VARIANTS) + 1 and "attention dropout 0.1" in text
