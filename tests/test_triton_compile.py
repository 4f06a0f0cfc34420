"""Every Triton kernel compiles for sm_90 without a GPU, in 16-bit and fp32 signatures, without register spills and
within the shared memory of an H100/H200.

The compile runs in a subprocess without TRITON_INTERPRET (conftest sets it to 1 in this process, and the
interpreter cannot compile); the per-kernel table (registers, spill bytes, shared memory) is printed (visible with
``pytest -s``). The attention kernels join the table through flash_attention.compile_jobs once they land."""

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
LLAMA_KERNELS = (
    "rms_norm_fwd",
    "rms_norm_bwd",
    "column_sums",
    "swiglu_fwd",
    "swiglu_bwd",
    "rope",
    "linear_swiglu",
    "swiglu_linear_bwd",
    "swiglu_linear_wgrad",
    "swiglu_ffn_recompute",
    "geglu_fwd",
    "geglu_bwd",
)
SM90_SHARED_BYTES = 232448  # the opt-in shared memory per block of an H100/H200
LINE = re.compile(r"^(SPILLS )?(\w+) (\w+) .*regs=(\d+) spills=(\d+) shared=(\d+) ")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "ckpt_ext.kernels.compile_check", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(proc.stdout)
    rows = [m.groups() for m in map(LINE.match, proc.stdout.splitlines()) if m]
    return proc, rows


def test_every_kernel_compiles_for_sm90(report):
    proc, rows = report
    assert "FAILED" not in proc.stdout, proc.stdout + proc.stderr
    compiled = {(name, dtype) for _, name, dtype, *_ in rows}
    for kernel in KERNELS:
        for dtype in ("fp16", "bf16"):
            assert (kernel, dtype) in compiled, f"{kernel} {dtype} was not compiled"
    for kernel in LLAMA_KERNELS:
        for dtype in ("bf16", "fp32"):
            assert (kernel, dtype) in compiled, f"{kernel} {dtype} was not compiled"


def test_no_config_spills_or_overflows_shared_memory(report):
    proc, rows = report
    assert rows, proc.stdout + proc.stderr
    for flag, name, dtype, regs, spills, shared in rows:
        assert not flag and int(spills) == 0, f"{name} {dtype} spills {spills} bytes ({regs} registers)"
        assert int(regs) <= 255 and int(shared) <= SM90_SHARED_BYTES, (name, dtype, regs, shared)
    assert proc.returncode == 0, proc.stdout + proc.stderr
