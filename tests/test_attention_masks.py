"""Issue 12's wrong mask cases, as regression tests, on every backend this machine runs.

- A query row with no visible key (left padding with causality; masked by bool, -inf or finfo.min) gives out = 0,
  lse = -inf and zero gradients, never NaN; the other rows equal float64 brute force.
- Integer masks raise TypeError (naming the accepted dtypes); a mask that requires grad raises instead of silently
  getting no gradient.
- The plain ckpt_ext.TransformerBlock (torch SDPA) and FusedCheckpointBlock agree with rows emptied by the mask.
- Hugging Face GPT-2 with left padding: loss and every gradient of apply_fused_checkpointing(model, "ffn"/"block")
  equal the unpatched model's. HF's sdpa path gives fully masked pad rows zero attention output, as our ops do, so
  there every label counts (also the first real token, predicted from a pad row); HF's eager path gives those rows
  the mean of the values instead, so there the labels predicted from pad rows are left out.
  These go through the transformer block; the coordinator is switching it to the gqa ops (block tests: "block").
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import ckpt_ext
from ckpt_ext import ops, reference_attention

BACKENDS = ["reference", "cpp"]
OP_BACKENDS = [*BACKENDS, pytest.param("triton", marks=pytest.mark.triton)]  # triton: interpreter, CPU tensors
KINDS = ["bool", "neg_inf", "finfo_min"]


def left_padded_mask(kind, b, t, pad):
    """(B, 1, 1, T) key mask hiding the first pad[i] keys of batch row i; with causality rows < pad[i] see no key."""
    keep = torch.arange(t)[None, :] >= torch.tensor(pad)[:, None]  # (B, T)
    keep = keep[:, None, None, :]
    if kind == "bool":
        return keep
    fill = float("-inf") if kind == "neg_inf" else torch.finfo(torch.float32).min
    return torch.zeros(keep.shape).masked_fill(~keep, fill)


def brute_force_grads(q, k, v, dout, keep_rows, mask, scale):
    """float64 causal attention by autograd; empty rows get an arbitrary visible key and zero dout (add nothing)."""
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    b, t, h, dh = q.shape
    g = h // k.shape[2]
    kr, vr = (x.repeat_interleave(g, dim=2) for x in leaves[1:])
    s = torch.einsum("bthd,bshd->bhts", leaves[0], kr) * scale
    visible = torch.ones(t, t, dtype=torch.bool).tril() & (mask if mask.dtype == torch.bool else mask > -1e30)
    visible = visible | ~keep_rows[:, None, :, None]  # empty rows: any key (their dout is 0)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    out = torch.einsum("bhts,bshd->bthd", p, vr)
    grads = torch.autograd.grad(out, leaves, dout.double() * keep_rows[:, :, None, None])
    return out.detach(), grads


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hk", [1, 2])
def test_empty_rows_give_zeros_and_zero_grads(backend, kind, hk):
    b, t, h, dh = 3, 7, 4, 8
    pad = [3, 0, 6]
    mask = left_padded_mask(kind, b, t, pad)
    q, k, v = (torch.randn(b, t, n, dh).requires_grad_() for n in (h, hk, hk))
    dout = torch.randn(b, t, h, dh)
    with ckpt_ext.set_backend(backend):
        out, lse = ops.gqa_attention_fwd(q, k, v, True, 0.0, 0, mask, 0.4)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    keep_rows = torch.arange(t)[None, :] >= torch.tensor(pad)[:, None]  # (B, T): rows with a visible key
    empty = ~keep_rows
    for x in (out, lse, dq, dk, dv):
        assert not x.isnan().any()
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    assert torch.isneginf(lse.transpose(1, 2)[empty]).all() and torch.isfinite(lse.transpose(1, 2)[keep_rows]).all()
    ref_out, (rq, rk, rv) = brute_force_grads(q.detach(), k.detach(), v.detach(), dout, keep_rows, mask, 0.4)
    torch.testing.assert_close(out[keep_rows].double(), ref_out[keep_rows], atol=1e-5, rtol=1e-5)
    for ours, ref in ((dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_empty_rows_packed_op_with_dropout(backend, kind):
    """The packed-qkv op (GPT-2's) with attention dropout: same rule, no NaN in out or dqkv."""
    b, t, heads, dh = 2, 9, 2, 4
    mask = left_padded_mask(kind, b, t, [4, 1])
    qkv = torch.randn(b, t, 3 * heads * dh, requires_grad=True)
    with ckpt_ext.set_backend(backend):
        out, lse = ops.attention_fwd(qkv, heads, True, 0.2, 3, mask)
        (dqkv,) = torch.autograd.grad(out, qkv, torch.randn_like(out))
    assert not out.isnan().any() and not dqkv.isnan().any()
    assert (out[0, :4] == 0).all() and (dqkv.view(b, t, 3, -1)[0, :4, 0] == 0).all()
    assert torch.isneginf(lse[0, :, :4]).all() and torch.isfinite(lse[0, :, 4:]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_mask_raises_type_error(backend, mask_dtype):
    q, k, v = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4)
    mask = torch.ones(1, 1, 5, 5, dtype=mask_dtype)
    with ckpt_ext.set_backend(backend):
        with pytest.raises(TypeError, match="torch.bool.*floating"):
            ops.gqa_attention_fwd(q, k, v, False, 0.0, 0, mask, 0.5)
        with pytest.raises(TypeError, match="torch.bool.*floating"):
            ops.attention_fwd(torch.randn(1, 5, 24), 2, False, 0.0, 0, mask)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fq, fk, fv, fm = (mode.from_tensor(x) for x in (q, k, v, mask))
        with pytest.raises(TypeError, match="attn_mask"):
            ops.gqa_attention_fwd(fq, fk, fv, False, 0.0, 0, fm, 0.5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_mask_that_requires_grad_raises(backend):
    """A learned additive bias would silently get no gradient: the op refuses it when autograd records the call."""
    q, k, v = (torch.randn(1, 5, 2, 4, requires_grad=True) for _ in range(3))
    bias = torch.zeros(1, 2, 5, 5, requires_grad=True)
    with ckpt_ext.set_backend(backend):
        with pytest.raises(ValueError, match="attn_mask requires grad"):
            ops.gqa_attention_fwd(q, k, v, False, 0.0, 0, bias, 0.5)
        with pytest.raises(ValueError, match="attn_mask requires grad"):
            ops.attention_fwd(torch.randn(1, 5, 24, requires_grad=True), 2, False, 0.0, 0, bias)
        out, _ = ops.gqa_attention_fwd(q, k, v, False, 0.0, 0, bias.detach(), 0.5)
        assert out.requires_grad


def test_bad_arguments_name_the_argument():
    q, k, v = torch.randn(1, 5, 3, 4), torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        ops.gqa_attention_fwd(q, k, v, False, 0.0, 0, None, 0.5)
    with pytest.raises(ValueError, match="causal=True needs"):
        ops.gqa_attention_fwd(q[:, :4, :2], k, v, True, 0.0, 0, None, 0.5)
    with pytest.raises(ValueError, match="attn_mask of shape"):
        ops.gqa_attention_fwd(q[:, :, :2], k, v, False, 0.0, 0, torch.zeros(1, 3, 5, 5), 0.5)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.gqa_attention_fwd(q[:, :, :2], k, v, False, 1.0, 0, None, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", ["none", "ffn", "block"])
def test_block_with_emptied_rows_matches_plain_block(backend, kind, policy):
    """TransformerBlock (torch SDPA) vs FusedCheckpointBlock with a left-padding mask that empties rows; the loss reads
    only rows with a visible key (SDPA gives finfo.min-emptied rows uniform attention, our ops zeros)."""
    _check_block(backend, kind, policy)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", ["bool", "finfo_min"])
def test_block_with_emptied_rows_matches_plain_block_triton(kind):
    _check_block("triton", kind, "block")


def _check_block(backend, kind, policy):
    b, t, d, heads = 3, 7, 24, 2
    pad = [3, 0, 6]
    mask = left_padded_mask(kind, b, t, pad)
    keep_rows = torch.arange(t)[None, :] >= torch.tensor(pad)[:, None]
    plain = ckpt_ext.TransformerBlock(d, heads, causal=True)
    fused = ckpt_ext.FusedCheckpointBlock.from_block(copy.deepcopy(plain), policy=policy)
    x = torch.randn(b, t, d)
    w = torch.randn(b, t, d) * keep_rows[:, :, None]
    results = []
    for block in (plain, fused):
        xi = x.clone().requires_grad_()
        with ckpt_ext.set_backend(backend):
            y = block(xi, attn_mask=mask)
            (y * w).sum().backward()
        assert not y.isnan().any() and not xi.grad.isnan().any()
        results.append((y[keep_rows], xi.grad, {n: p.grad for n, p in block.named_parameters()}))
    (y_ref, dx_ref, g_ref), (y, dx, g) = results
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(dx, dx_ref, atol=2e-5, rtol=2e-5)
    for name, grad in g_ref.items():
        assert not g[name].isnan().any(), name
        torch.testing.assert_close(g[name], grad, atol=5e-5, rtol=5e-5, msg=name)


# ------------------------------------------------------------------------- Hugging Face GPT-2 with left padding
transformers = pytest.importorskip("transformers")


def _gpt2(impl):
    sizes = dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=97)
    no_dropout = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    cfg = transformers.GPT2Config(**sizes, **no_dropout, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = impl
    return transformers.GPT2LMHeadModel(cfg).train()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("policy", ["ffn", "block"])
def test_hf_gpt2_left_padding_matches_unpatched(backend, impl, policy):
    """Issue 12's case (loss 4.5912 instead of 4.5957, c_attn.weight.grad 0.89 off): attention_mask [[0,0,0,1,...]]."""
    _check_hf_gpt2(backend, impl, policy)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_hf_gpt2_left_padding_matches_unpatched_triton():
    _check_hf_gpt2("triton", "sdpa", "block")


def _check_hf_gpt2(backend, impl, policy):
    from ckpt_ext.integrations.huggingface import apply_fused_checkpointing

    ref = _gpt2(impl)
    model = copy.deepcopy(ref)
    assert apply_fused_checkpointing(model, policy=policy) == 2
    ids = torch.randint(1, 97, (3, 8))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8, [0, 0, 0, 0, 0, 0, 1, 1]])
    labels = ids.masked_fill(mask == 0, -100)
    if impl == "eager":  # HF eager: pad rows attend uniformly; the first real token is predicted from a pad row
        labels[0, 3], labels[2, 6] = -100, -100
    with ckpt_ext.set_backend(backend):
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
    loss_ref = ref(ids, attention_mask=mask, labels=labels, use_cache=False).loss
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert not p.grad.isnan().any(), name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_plain_sdpa_agrees_on_bool_and_neg_inf_empty_rows():
    """Sanity anchor: torch's SDPA also returns zeros for rows a bool or -inf mask empties (our rule)."""
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    for kind in ("bool", "neg_inf"):
        m = left_padded_mask(kind, 1, 5, [2])
        causal = torch.ones(5, 5, dtype=torch.bool).tril()
        m = m & causal if kind == "bool" else m.masked_fill(~causal, float("-inf"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        with ckpt_ext.set_backend("reference"):
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ours = reference_attention.gqa_attention_fwd(qt, kt, vt, False, 0.0, 0, m, 0.5)[0]
        torch.testing.assert_close(ours.transpose(1, 2), o)
