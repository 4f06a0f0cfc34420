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
    """Counts Hugging Face layer calls that took the fused path (GPT-2, Llama-family, ViT and encoder adapters)."""
    from ckpt_ext.integrations import hf_bert, hf_gpt2, hf_llama, hf_modernbert, hf_vit

    calls = []
    for mod in (hf_gpt2, hf_llama, hf_vit, hf_bert, hf_modernbert):
        real = mod.fused_block
        monkeypatch.setattr(mod, "fused_block", lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    return calls
