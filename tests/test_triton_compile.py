"""Every Triton kernel compiles for sm_90 without a GPU, in fp16 and bf16 signatures, and reports its shared memory.

The compile runs in a subprocess without TRITON_INTERPRET (conftest sets it to 1 in this process, and the
interpreter cannot compile); the per-kernel report is printed (visible with ``pytest -s``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.compile

KERNELS = (
    "layer_norm_fwd",
    "layer_norm_bwd",
    "bias_gelu",
    "gelu_bwd",
    "dropout_add",
    "ffn_recompute",
    "linear_bias_gelu",
    "linear_dropout_add",
    "linear_gelu_bwd",
    "gelu_linear_wgrad",
)
SM90_SHARED_BYTES = 232448  # the opt-in shared memory per block of an H100/H200


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "ckpt_ext.kernels.compile_check", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if " shared=" in ln]
    for kernel in KERNELS:
        for dtype in ("fp16", "bf16"):
            assert any(ln.startswith(f"{kernel} {dtype} ") for ln in lines), f"{kernel} {dtype} was not compiled"
    for ln in lines:
        shared = int(re.search(r"shared=(\d+)", ln).group(1))
        assert shared <= SM90_SHARED_BYTES, ln
