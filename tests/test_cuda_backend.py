"""The csrc/cuda kernels (backend "cuda") run on a GPU against the reference math on the same CUDA tensors.

Every graph op of tests/test_ops.py's samples (the GPT-2 ops, the Llama-family ops, attention) is called on CUDA
tensors with ``set_backend("cuda")`` and with ``set_backend("reference")``; outputs must agree within fp32 rounding.
Then the Llama-form and GPT-2 blocks per policy. Needs a CUDA device and the extension built with CUDA kernels
(bench/gpu_check.sh runs this lane on the lent GPU); elsewhere these tests are skipped, not run.
"""

import copy

import pytest
import torch

import ckpt_ext
from ckpt_ext import backend

from test_ops import sample_calls

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _to_cuda(args):
    return tuple(a.detach().cuda() if isinstance(a, torch.Tensor) else a for a in args)


def test_extension_has_cuda_kernels():
    assert backend.cuda_ext_available(), "ckpt_ext._C was built without CUDA kernels (CKPT_EXT_BUILD_CUDA=1)"


@pytest.mark.parametrize("index", range(len(sample_calls())))
def test_cuda_kernel_matches_reference(index):
    op, args = sample_calls()[index]
    args = _to_cuda(args)
    with ckpt_ext.set_backend("reference"):
        expect = op(*args)
    with ckpt_ext.set_backend("cuda"):
        got = op(*args)
    expect = expect if isinstance(expect, tuple) else (expect,)
    got = got if isinstance(got, tuple) else (got,)
    for g, e in zip(got, expect):
        assert g.dtype == e.dtype and g.shape == e.shape, op
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("policy", list(ckpt_ext.POLICIES))
@pytest.mark.parametrize("llama", [False, True])
def test_cuda_backend_block(policy, llama):
    torch.manual_seed(0)
    kw = dict(activation="swiglu", n_kv_heads=2) if llama else {}
    blk = ckpt_ext.TransformerBlock(64, 4, **kw).cuda()
    x, g = torch.randn(2, 33, 64, device="cuda"), torch.randn(2, 33, 64, device="cuda")
    pe = None
    if llama:
        ang = torch.randn(1, 33, 8, device="cuda")
        pe = (torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin())
    results = []
    for name in ("reference", "cuda"):
        fused = ckpt_ext.FusedCheckpointBlock.from_block(copy.deepcopy(blk), policy)
        xr = x.clone().requires_grad_(True)
        with ckpt_ext.set_backend(name):
            out = fused(xr, position_embeddings=pe)
            out.backward(g)
        results.append([out, xr.grad] + [p.grad for p in fused.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
