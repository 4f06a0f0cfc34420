"""The whole FusedCheckpointBlock on the triton backend, for every policy, against the reference backend.

Same parameters, same input, same dropout seeds: output, input gradient and every parameter gradient must match
(fp32 on CPU under TRITON_INTERPRET=1; fp32 and bf16 on CUDA when a GPU is present)."""

from __future__ import annotations

import pytest
import torch

import ckpt_ext
from ckpt_ext.block import init_block_

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

POLICIES = ("none", "pointwise", "ffn", "block")


def _run(block, x, backend: str, seed: int):
    x = x.detach().clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with ckpt_ext.set_backend(backend):
        out = block(x)
        grad = torch.randn_like(out, generator=torch.Generator(device=out.device).manual_seed(7))
        out.backward(grad)
    grads = {name: p.grad.detach().clone() for name, p in block.named_parameters()}
    return out.detach(), x.grad.detach(), grads


def _compare(block, x, atol, rtol):
    ref = _run(block, x, "reference", seed=3)
    ours = _run(block, x, "triton", seed=3)
    torch.testing.assert_close(ours[0], ref[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(ours[1], ref[1], atol=atol, rtol=rtol)
    for name, g in ref[2].items():
        torch.testing.assert_close(ours[2][name], g, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("activation,dropout", [("gelu", 0.0), ("gelu_tanh", 0.2)])
def test_block_matches_reference(policy, activation, dropout):
    block = ckpt_ext.FusedCheckpointBlock(72, 4, policy=policy, activation=activation, dropout=dropout, mlp_ratio=2.5)
    init_block_(block, std=0.1)
    _compare(block, torch.randn(2, 7, 72), atol=2e-5, rtol=2e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-4, 1e-3), (torch.bfloat16, 6e-2, 5e-2)])
def test_block_matches_reference_cuda(policy, dtype, atol, rtol):
    block = ckpt_ext.FusedCheckpointBlock(256, 4, policy=policy, activation="gelu_tanh", dropout=0.1)
    init_block_(block)
    block = block.to(device="cuda", dtype=dtype)
    _compare(block, torch.randn(2, 128, 256, device="cuda", dtype=dtype), atol=atol, rtol=rtol)


def test_block_runs_the_fused_kernels(monkeypatch):
    """policy "ffn" on the triton backend reaches the Triton FC1 (linear_bias_gelu), the projection/FC2 epilogue GEMM
    (linear_dropout_add), ffn_recompute and LayerNorm launchers."""
    from ckpt_ext import backend
    from ckpt_ext.backends import triton as triton_backend

    calls = []
    real = triton_backend.impls

    def recording():
        impls = dict(real())
        for name in ("linear_bias_gelu", "linear_dropout_add", "ffn_recompute", "layer_norm_bwd"):
            impls[name] = lambda *a, _f=impls[name], _n=name: calls.append(_n) or _f(*a)
        return impls

    monkeypatch.setattr(triton_backend, "impls", recording)
    monkeypatch.setattr(backend, "_tables", {})  # resolutions are cached: resolve afresh through the recorder
    block = ckpt_ext.FusedCheckpointBlock(72, 4, policy="ffn")
    x = torch.randn(1, 5, 72, requires_grad=True)
    with ckpt_ext.set_backend("triton"):
        block(x).sum().backward()
    assert calls.count("linear_bias_gelu") == 1 and calls.count("ffn_recompute") == 1
    assert calls.count("linear_dropout_add") == 2  # attention projection and FC2
    assert calls.count("layer_norm_bwd") == 2
