"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit runs, so the triton lane can run on CPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_reference_determinism():
    torch.manual_seed(0)
    yield
