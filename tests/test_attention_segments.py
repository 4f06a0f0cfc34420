"""segment_ids (key padding and packed sequences as a (B, S) kernel argument) on every backend this machine runs.

- The converters (ckpt_ext/segments.py): values, validation errors naming the argument, key_ranges bounding every
  visible key.
- ops.gqa_attention_fwd/_bwd with segment_ids (reference, cpp, triton under the interpreter) against the float64
  reference fed the equivalent bool mask (segments.visibility): out, lse, dq, dk, dv, × causal × GQA ratio 1/2/h ×
  dropout 0 and 0.2 (the hash dropout must be identical: its index does not depend on the mask) × T 1/7/33/70 ×
  padding (empty rows: zeros, lse = -inf, zero grads), packed, non-contiguous ids (no tile skipping possible), an
  encoder's key mask (negative ids: padded rows still attend) alone and inside packed sequences;
  also segment_ids combined with an additive finfo.min attn_mask.
- opcheck with segment_ids; bad segment_ids raise naming the argument.
- No allocation reaches an fp32 (B, h, T, T) tensor at T = 128 with segment_ids (reference, cpp).
- Blocks: FusedCheckpointBlock(segment_ids) vs the plain block (which turns them into the bool mask) in fp32 and
  fp64, GPT-2 and Llama forms, every policy; with dropout, segment_ids vs the equivalent bool mask in the fused block.
"""

import pytest
import torch
from test_attention_memory import FULL_FP32_BYTES, largest_allocation
from test_llama_block import llama_block, rope_tables

import ckpt_ext
from ckpt_ext import backend as backend_module
from ckpt_ext import ops, reference_attention, segments

from helpers import assert_within_torch_error, fused_copy, make_block, run_step

OP_BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)]
H, DH = 4, 8


def make_ids(kind: str, b: int, t: int) -> torch.Tensor:
    """(B, T) int32 segment ids of one of the layouts the tests cover."""
    g = torch.Generator().manual_seed(t * 31 + b)
    if kind == "padding":  # left padding in row 0, right padding in row 2, none in row 1
        keep = torch.ones(b, t, dtype=torch.bool)
        keep[0, : t // 2] = False
        if b > 2:
            keep[2, t - t // 3 :] = False
        return segments.from_keep_mask(keep)
    if kind == "packed":  # sequences of random lengths per row, trailing padding
        rows = []
        for _ in range(b):
            cuts = torch.randint(0, t + 1, (3,), generator=g).sort().values
            cu = torch.cat([torch.zeros(1, dtype=torch.int64), cuts])
            rows.append(segments.from_cu_seqlens(cu, t))
        return torch.cat(rows)
    if kind == "key_padding":  # an encoder's key mask (padded rows still attend): left in row 0, right in row 2
        keep = torch.ones(b, t, dtype=torch.bool)
        keep[0, : t // 2] = False
        if b > 2:
            keep[2, t - t // 3 :] = False
        return segments.from_key_mask(keep)
    if kind == "key_packed":  # packed sequences with random padded (negative) tokens, then trailing 0 padding
        ids = make_ids("packed", b, t)
        padded = torch.rand(b, t, generator=g) < 0.3
        last = torch.ones_like(padded)  # each sequence's last token stays a key
        last[:, :-1] = ids[:, 1:] != ids[:, :-1]
        return torch.where(padded & ~last & (ids > 0), -ids, ids)
    if kind == "signed":  # ids of both signs repeating non-contiguously (no tile skipping)
        return torch.randint(-2, 3, (b, t), generator=g, dtype=torch.int32)
    return torch.randint(0, 3, (b, t), generator=g, dtype=torch.int32)  # "scattered": ids repeat non-contiguously


def make_qkv(b, t, hk, dtype=torch.float32):
    return [torch.randn(b, t, n, DH, dtype=dtype) for n in (H, hk, hk)]


def run(backend, q, k, v, dout, causal, dropout_p, mask, ids, scale=0.4):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with ckpt_ext.set_backend(backend):
        out, lse = ops.gqa_attention_fwd(*leaves, causal, dropout_p, 7, mask, scale, ids)
        grads = torch.autograd.grad(out, leaves, dout)
    return out, lse, grads


def reference64(q, k, v, dout, causal, dropout_p, mask, scale=0.4):
    """float64 reference math with the equivalent 4-D mask instead of segment ids."""
    q, k, v, dout = (x.double() for x in (q, k, v, dout))
    out, lse = reference_attention.gqa_attention_fwd(q, k, v, causal, dropout_p, 7, mask, scale)
    grads = reference_attention.gqa_attention_bwd(dout, q, k, v, out, lse, causal, dropout_p, 7, mask, scale)
    return out, lse, grads


def assert_matches(ours, ref, atol=2e-5):
    (out, lse, grads), (rout, rlse, rgrads) = ours, ref
    torch.testing.assert_close(out.double(), rout, atol=atol, rtol=atol)
    torch.testing.assert_close(lse.double(), rlse, atol=atol, rtol=atol)  # -inf exactly where the reference has it
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g.double(), rg, atol=atol, rtol=atol)


# ------------------------------------------------------------------------------------------------ converters
def test_from_lengths():
    ids = segments.from_lengths(torch.tensor([3, 0, 5]), 5)
    assert ids.dtype == torch.int32
    assert ids.tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="lengths"):
        segments.from_lengths(torch.tensor([6]), 5)
    with pytest.raises(TypeError, match="lengths"):
        segments.from_lengths(torch.tensor([1.0]), 5)
    with pytest.raises(ValueError, match="seq_len"):
        segments.from_lengths(torch.tensor([1]), -1)


def test_from_keep_mask():
    assert segments.from_keep_mask(torch.tensor([[0, 1, 1]])).tolist() == [[0, 1, 1]]
    assert segments.from_keep_mask(torch.tensor([[True, False]])).dtype == torch.int32
    with pytest.raises(ValueError, match="keep"):
        segments.from_keep_mask(torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="keep"):
        segments.from_keep_mask(torch.ones(2, 3, 4))


def test_from_cu_seqlens():
    ids = segments.from_cu_seqlens(torch.tensor([0, 2, 2, 5], dtype=torch.int32), 7)
    assert ids.tolist() == [[1, 1, 3, 3, 3, 0, 0]]  # sequence 2 is empty
    with pytest.raises(ValueError, match="cu_seqlens"):
        segments.from_cu_seqlens(torch.tensor([1, 3]), 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        segments.from_cu_seqlens(torch.tensor([0, 3, 2]), 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        segments.from_cu_seqlens(torch.tensor([0, 5]), 4)
    with pytest.raises(TypeError, match="cu_seqlens"):
        segments.from_cu_seqlens(torch.tensor([0.0, 2.0]), 4)


def test_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 9, 10]])
    assert segments.from_position_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 1]]
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    assert segments.from_position_ids(pos, keep).tolist() == [[1, 1, 1, 2, 2, 3], [0, 0, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="keep"):
        segments.from_position_ids(pos, keep[:, :3])
    with pytest.raises(ValueError, match="position_ids"):
        segments.from_position_ids(pos[0])


@pytest.mark.parametrize("kind", ["padding", "packed", "scattered", "key_padding", "key_packed", "signed"])
def test_tile_ranges_bound_every_visible_key(kind):
    """key_ranges bound the keys each row sees, query_ranges the rows that see each key; both non-decreasing, and
    exact (nothing inside a range is hidden) when every sequence's keys are one contiguous run."""
    ids = make_ids(kind, 3, 33)
    vis = segments.visibility(ids)[:, 0]  # (B, T, S): row, key
    cols = torch.arange(33)
    for (start, end), seen in ((segments.key_ranges(ids), vis), (segments.query_ranges(ids), vis.transpose(1, 2))):
        inside = (cols[None, None, :] >= start[..., None]) & (cols[None, None, :] <= end[..., None])
        assert not (seen & ~inside).any()
        assert (start[:, 1:] >= start[:, :-1]).all() and (end[:, 1:] >= end[:, :-1]).all()
        if kind in ("padding", "packed", "key_padding"):
            assert (inside.sum(-1) == seen.sum(-1)).all()


def test_key_mask_ids_skip_padded_key_tiles():
    """An encoder's right padding: the padded rows see the real keys, the padded keys are seen by no row (an empty
    query range: the dk/dv kernel skips their tiles)."""
    ids = segments.from_key_mask(torch.tensor([[1, 1, 1, 0, 0]]))
    assert ids.tolist() == [[1, 1, 1, -1, -1]]
    assert [r.tolist() for r in segments.key_ranges(ids)] == [[[0] * 5], [[2] * 5]]
    start, end = segments.query_ranges(ids)
    assert start.tolist() == [[0, 0, 0, 5, 5]] and end.tolist() == [[4] * 5]
    assert segments.visibility(ids)[0, 0].tolist() == [[True] * 3 + [False] * 2] * 5


# ------------------------------------------------------------------------------------------------ ops
CASES = [("padding", 3, 7), ("packed", 3, 33), ("scattered", 3, 20), ("padding", 1, 1), ("packed", 1, 70),
         ("key_padding", 3, 33), ("key_packed", 2, 40), ("signed", 1, 17)]  # fmt: skip


def _op_cases():
    """(backend, kind, b, t, hk): the full grid on reference and cpp; the Triton interpreter is slow, so there every
    case runs at one GQA ratio, the ratios taking turns over the cases (each ratio and each case still covered)."""
    out = []
    for backend in ("reference", "cpp", "triton"):
        marks = [pytest.mark.triton] if backend == "triton" else []
        for i, (kind, b, t) in enumerate(CASES):
            ratios = [[H, 2, 1][i % 3]] if backend == "triton" else [H, 2, 1]
            out += [pytest.param(backend, kind, b, t, hk, marks=marks) for hk in ratios]
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend, kind, b, t, hk", _op_cases())
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_segment_ids_match_the_equivalent_bool_mask(backend, kind, b, t, hk, causal, dropout_p):
    ids = make_ids(kind, b, t)
    q, k, v = make_qkv(b, t, hk)
    dout = torch.randn(b, t, H, DH)
    ours = run(backend, q, k, v, dout, causal, dropout_p, None, ids)
    assert_matches(ours, reference64(q, k, v, dout, causal, dropout_p, segments.visibility(ids)))
    out, lse, (dq, _, _) = ours
    empty = ids == 0  # (B, T): padded rows see no key
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    assert torch.isneginf(lse.transpose(1, 2)[empty]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_segment_ids_combine_with_an_additive_mask(backend, dropout_p):
    b, t, hk = 3, 19, 2
    ids = make_ids("packed", b, t)
    bias = torch.randn(b, 1, t, t).masked_fill(torch.rand(b, 1, t, t) < 0.3, torch.finfo(torch.float32).min)
    q, k, v = make_qkv(b, t, hk)
    dout = torch.randn(b, t, H, DH)
    ours = run(backend, q, k, v, dout, True, dropout_p, bias, ids)
    combined = torch.where(segments.visibility(ids), bias, float("-inf"))  # fp32: its empty-row threshold
    assert_matches(ours, reference64(q, k, v, dout, True, dropout_p, combined))


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_int64_ids_and_bf16(backend):
    b, t, hk = 2, 17, 2
    ids = make_ids("packed", b, t).long()
    q, k, v = make_qkv(b, t, hk, torch.bfloat16)
    dout = torch.randn(b, t, H, DH, dtype=torch.bfloat16)
    ours = run(backend, q, k, v, dout, True, 0.0, None, ids)
    ref = reference64(q, k, v, dout, True, 0.0, segments.visibility(ids))
    assert_matches(ours, ref, atol=3e-2)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_the_minimum_id_reads_as_padding(backend, dtype):
    """An id equal to its dtype's minimum has no positive |id| (abs wraps): every backend treats it as padding (its
    row sees nothing, its key is hidden), as the reference's rule does, instead of a row seeing its own run."""
    low = torch.iinfo(dtype).min
    ids = torch.tensor([[low] * 8 + [1] * 8, [1] * 6 + [low] * 4 + [2] * 6], dtype=dtype)
    q, k, v = make_qkv(2, 16, 2)
    dout = torch.randn(2, 16, H, DH)
    ours = run(backend, q, k, v, dout, False, 0.0, None, ids)
    assert_matches(ours, reference64(q, k, v, dout, False, 0.0, segments.visibility(ids)))
    out, lse, _ = ours
    assert (out[0, :8] == 0).all() and torch.isneginf(lse[0, :, :8]).all()


def test_bad_segment_ids_raise_naming_the_argument():
    q, k, v = make_qkv(2, 5, 2)
    with pytest.raises(TypeError, match="segment_ids"):
        ops.gqa_attention_fwd(q, k, v, True, 0.0, 0, None, 0.5, torch.ones(2, 5))
    with pytest.raises(ValueError, match="segment_ids"):
        ops.gqa_attention_fwd(q, k, v, True, 0.0, 0, None, 0.5, torch.ones(2, 4, dtype=torch.int32))
    kx, vx = make_qkv(2, 6, 2)[1:]
    with pytest.raises(ValueError, match="segment_ids"):
        ops.gqa_attention_fwd(q, kx, vx, False, 0.0, 0, None, 0.5, torch.ones(2, 6, dtype=torch.int32))


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_with_segment_ids(backend, requires_grad):
    b, t, hk = 3, 7, 2
    ids = make_ids("packed", b, t)
    q, k, v = (x.requires_grad_(requires_grad) for x in make_qkv(b, t, hk))
    out, lse = reference_attention.gqa_attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.2, 3, None, 0.35, ids)
    with ckpt_ext.set_backend(backend):
        torch.library.opcheck(ops.gqa_attention_fwd, (q, k, v, True, 0.2, 3, None, 0.35, ids))
        torch.library.opcheck(ops.gqa_attention_fwd, (q, k, v, False, 0.0, 3, None, 0.35, ids.long()))
        dout = torch.randn(b, t, H, DH)
        torch.library.opcheck(ops.gqa_attention_bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, True, 0.2, 3,
                                                      None, 0.35, ids))  # fmt: skip
        keys = make_ids("key_packed", b, t)  # negative ids: an encoder's padded keys
        torch.library.opcheck(ops.gqa_attention_fwd, (q, k, v, False, 0.2, 3, None, 0.35, keys))
        out, lse = reference_attention.gqa_attention_fwd(q.detach(), k.detach(), v.detach(), False, 0.2, 3, None,
                                                         0.35, keys)  # fmt: skip
        torch.library.opcheck(ops.gqa_attention_bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, False, 0.2,
                                                      3, None, 0.35, keys))  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_no_per_head_t_by_t_allocation_with_segment_ids(backend, dropout_p):
    b, t = 2, 128
    q = torch.randn(b, t, H, 16, requires_grad=True)
    k, v = (torch.randn(b, t, 2, 16, requires_grad=True) for _ in range(2))
    ids = make_ids("packed", b, t)
    dout = torch.randn(b, t, H, 16)

    def step():
        out, _ = ops.gqa_attention_fwd(q, k, v, True, dropout_p, 3, None, 0.25, ids)
        out.backward(dout)

    with ckpt_ext.set_backend(backend):
        largest = largest_allocation(step)
    assert q.grad is not None and k.grad is not None
    assert largest < FULL_FP32_BYTES, (largest, FULL_FP32_BYTES)


# ------------------------------------------------------------------------------------------------ blocks
POLICIES = ["none", "pointwise", "ffn", "block_keep_attn", "block"]


def _block(family, dtype, **kwargs):
    if family == "gpt2":
        return make_block(32, 4, dtype=dtype, **kwargs), None
    blk = llama_block(d=48, heads=4, kv=2, dtype=dtype, **kwargs)
    return blk, rope_tables(3, 20, 12, dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("policy", POLICIES)
def test_block_with_segment_ids_matches_the_plain_block(backend, family, policy):
    """FusedCheckpointBlock(segment_ids) vs the plain block (SDPA with the equivalent mask) in fp32 and fp64."""
    ids = make_ids("packed", 3, 20)
    ids[1, :5] = 0  # and left padding
    block, pe = _block(family, torch.float32)
    block64, pe64 = _block(family, torch.float64)
    x, grad = torch.randn(3, 20, block.d_model), torch.randn(3, 20, block.d_model)
    with ckpt_ext.set_backend(backend):
        ours = run_step(fused_copy(block, policy), x, grad, segment_ids=ids, position_embeddings=pe)
    plain = run_step(block, x, grad, segment_ids=ids, position_embeddings=pe)
    ref = run_step(block64, x.double(), grad.double(), segment_ids=ids, position_embeddings=pe64)
    assert_within_torch_error(ours, plain, ref, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("policy", POLICIES)
def test_block_segment_ids_equal_the_bool_mask_with_dropout(backend, policy):
    """With attention and residual dropout the fused block gives the same output and gradients whether padding and
    packing come as segment_ids or as their (B, 1, T, T) bool mask (same seed)."""
    ids = make_ids("packed", 3, 20)
    block, _ = _block("gpt2", torch.float32, dropout=0.1, attn_dropout=0.2)
    x, grad = torch.randn(3, 20, 32), torch.randn(3, 20, 32)
    fused = fused_copy(block, policy)
    with ckpt_ext.set_backend(backend):
        torch.manual_seed(11)
        with_ids = run_step(fused, x, grad, segment_ids=ids)
        torch.manual_seed(11)
        with_mask = run_step(fused, x, grad, attn_mask=segments.visibility(ids))
    for a, b in zip(with_ids, with_mask):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_block_rejects_bad_segment_ids():
    block, _ = _block("gpt2", torch.float32)
    x = torch.randn(2, 5, 32)
    with pytest.raises(TypeError, match="segment_ids"):
        fused_copy(block, "ffn")(x, segment_ids=torch.ones(2, 5))
    with pytest.raises(ValueError, match="segment_ids"):
        block(x, segment_ids=torch.ones(2, 4, dtype=torch.int32))


@pytest.mark.parametrize("policy", ["ffn", "block"])
def test_compiled_block_takes_segment_ids(policy):
    """Under torch.compile(fullgraph=True) the opaque fused_block_fwd/_bwd ops carry segment_ids: same output and
    gradients as eager; opcheck of the forward op with them."""
    from ckpt_ext.compiled import fused_block_fwd, make_spec
    from ckpt_ext.functional import param_names

    torch._dynamo.reset()
    block, pe = _block("llama", torch.float32)
    ids = make_ids("packed", 3, 20)
    x, grad = torch.randn(3, 20, 48), torch.randn(3, 20, 48)
    ref = run_step(fused_copy(block, policy), x, grad, segment_ids=ids, position_embeddings=pe)
    compiled = torch.compile(fused_copy(block, policy), fullgraph=True, backend="aot_eager")
    ours = run_step(compiled, x, grad, segment_ids=ids, position_embeddings=pe)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    fused = fused_copy(block, policy)
    cfg, p = fused.block_config(), fused.parameter_tensors()
    names = param_names(cfg)
    params = [p[n] for n in names if p[n] is not None]
    spec = make_spec(cfg, "cpu", "".join("0" if p[n] is None else "1" for n in names))
    seed = torch.zeros(1, dtype=torch.int64)
    torch.library.opcheck(fused_block_fwd, (x.requires_grad_(), None, *pe, params, seed, spec, ids))


# ------------------------------------------------------------------------------------------------ Hugging Face
@pytest.mark.parametrize("layout", ["left", "packed", "packed_left", "right"])
def test_hf_llama_padding_and_packing_take_the_segment_path(monkeypatch, layout):
    """Left padding, right padding and packed sequences (position_ids restarting) reach the attention op as segment
    ids, no 4-D mask, with the unpatched model's loss and gradients; right padding as key ids (1 / -1: Hugging Face
    lets its pad rows see the real keys before them)."""
    pytest.importorskip("transformers")
    from test_hf_llama import assert_parity, batch, make_model

    inputs = batch("right" if layout == "right" else ("left" if "left" in layout else None))
    if "packed" in layout:  # without a cache (use_cache=False, as under gradient checkpointing) 4.57 packs by position
        inputs["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]] * 2)
        inputs["use_cache"] = False
    if layout == "packed_left":
        inputs["position_ids"] = torch.tensor([[1, 1, 1, 0, 1, 2, 0, 1, 2], [1, 0, 1, 2, 3, 0, 1, 0, 1]])
    seen = []
    real_resolve = backend_module._resolve

    def spy(name, op, device_type):  # the block's fast path calls the kernel the graph op routes to: record there
        impl = real_resolve(name, op, device_type)
        return (lambda *a: seen.append((a[6], a[8])) or impl(*a)) if op == "gqa_attention_fwd" else impl

    monkeypatch.setattr(backend_module, "_resolve", spy)
    monkeypatch.setattr(backend_module, "_tables", {})  # resolve afresh through the spy
    assert_parity(make_model("llama", kv=2), inputs, "block")
    assert seen
    assert all(mask is None and ids is not None for mask, ids in seen)
    ids = seen[0][1]
    if layout == "right":
        assert ids.tolist() == [[1] * 6 + [-1] * 3, [1] * 9]
    if layout in ("left", "packed_left"):  # with a 2-D padding mask 4.57 does not pack: padding alone
        assert ids.tolist() == [[0, 0, 0] + [1] * 6, [0] + [1] * 8]
    if layout == "packed":
        assert ids.tolist() == [[1, 1, 1, 1, 2, 2, 2, 3, 3]] * 2


def test_hf_segment_conversion_is_shared_within_a_forward():
    """The layers of one forward share one conversion; a layer meeting the mask again (a new forward) rebuilds it, so
    a mask changed in place in between is read afresh."""
    from ckpt_ext.integrations.hf_masks import layer_mask

    keep = torch.tensor([[False, True, True, True]])
    mask = keep[:, None, None, :] & torch.ones(4, 4, dtype=torch.bool).tril()  # (1, 1, 4, 4)
    layer0, layer1 = torch.nn.Identity(), torch.nn.Identity()
    first = layer_mask(mask, 4, True, layer0, 1).segment_ids(mask)
    assert first.tolist() == [[0, 1, 1, 1]]
    assert layer_mask(mask, 4, True, layer1, 1).segment_ids(mask) is first
    mask[0, 0, 3, 1] = False  # no longer causal ∧ keep ∧ segment
    assert layer_mask(mask, 4, True, layer0, 1).segment_ids(mask) is None
