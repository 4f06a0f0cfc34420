"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit runs, so the triton lane can run on CPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_reference_determinism():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fused_calls(monkeypatch):
    """Hugging Face layer calls that took the fused path (every adapter runs through hf_adapter's skeleton), each as
    the positional arguments it handed fused_block: (x, params, config, attn_mask, position_embeddings, segment_ids)."""
    from ckpt_ext.integrations import hf_adapter

    calls = []
    real = hf_adapter.fused_block
    monkeypatch.setattr(hf_adapter, "fused_block", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls
