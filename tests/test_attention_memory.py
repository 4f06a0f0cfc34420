"""No per-head (B, h, T, T) tensor at T = 128 on the reference and cpp backends, forward and backward.

The profiler's allocator events (torch.profiler with profile_memory=True; one "[memory]" event per allocation, also
inside custom ops and aten kernels) give every allocation's size; none may reach the bytes of an fp32 (B, h, T, T)
tensor, the smallest dtype any scores or probabilities are computed in. The reference runs one head at a time
((B, T, S) tiles), the cpp route aten's flash kernel or (kv group × 64 query rows) tiles. The check itself is shown to
fail on torch's math SDPA with a mask and dropout, which materializes the probabilities."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import ckpt_ext
from ckpt_ext import ops

B, T, H, DH = 2, 128, 4, 16
FULL_FP32_BYTES = B * H * T * T * 4


def largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]
    assert sizes, "the profiler recorded no allocation"
    return max(sizes)


def _mask(kind):
    keep = torch.rand(B, 1, T, T) > 0.2
    if kind is None:
        return None
    return keep if kind == "bool" else torch.zeros(B, 1, T, T).masked_fill(~keep, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("hk", [1, 4])
@pytest.mark.parametrize("causal, dropout_p, mask", [(True, 0.0, None), (True, 0.1, "bool"), (False, 0.1, "float")])
def test_no_per_head_t_by_t_allocation(backend, hk, causal, dropout_p, mask):
    q = torch.randn(B, T, H, DH, requires_grad=True)
    k, v = (torch.randn(B, T, hk, DH, requires_grad=True) for _ in range(2))
    m = _mask(mask)
    dout = torch.randn(B, T, H, DH)

    def step():
        out, _ = ops.gqa_attention_fwd(q, k, v, causal, dropout_p, 3, m, DH**-0.5)
        out.backward(dout)

    with ckpt_ext.set_backend(backend):
        largest = largest_allocation(step)
    assert q.grad is not None and k.grad is not None
    assert largest < FULL_FP32_BYTES, (largest, FULL_FP32_BYTES)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_packed_op_no_per_head_t_by_t_allocation(backend):
    qkv = torch.randn(B, T, 3 * H * DH, requires_grad=True)
    m = _mask("float")

    def step():
        out, _ = ops.attention_fwd(qkv, H, True, 0.1, 5, m)
        out.sum().backward()

    with ckpt_ext.set_backend(backend):
        assert largest_allocation(step) < FULL_FP32_BYTES


def test_the_check_sees_a_materialized_probability_matrix():
    q, k, v = (torch.randn(B, H, T, DH) for _ in range(3))
    m = _mask("float")
    largest = largest_allocation(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.1))
    assert largest >= FULL_FP32_BYTES
