"""Compile every csrc/cuda/*.cu to an sm_90 object with nvcc, without a GPU and against the installed torch's headers,
so that a CUDA syntax or type error fails `make test` (the full build + registration check is `make check-cuda`).

A CPU torch wheel ships c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h:
-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it (it only defines export macros). One full nvcc -c per file (host and
device code, sm_90 SASS + PTX), two at a time, largest file first so that the two workers finish together.

Time: nvcc spends nearly all of it parsing headers (cudafe++, cicc and the host compiler each parse the whole
translation unit; ptxas is < 1 s), so csrc/cuda/cuda_utils.cuh includes only the ATen headers the kernels use instead
of <ATen/ATen.h> (every op's declaration). That took this test from ~150-230 s to ~50-75 s on 2 busy cores, not changing
what it compiles: every .cu file, on its own, for sm_90. With the Llama-family files (rms_norm, swiglu, rope) it is 7
kernel files, ~7.5 CPU-minutes in all (measured with the 2 cores shared by 5 test runs: 16.5 min wall).

test_every_cpu_kernel_has_a_cuda_kernel_in_the_sources reads the m.impl registrations of csrc/cpu and csrc/cuda: the
check `make check-cuda` makes on the built CUDA extension, in milliseconds and without the 5.5 GB CUDA torch.
"""

import glob
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")), key=lambda p: (-os.path.getsize(p), p))
NVCC = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"

# nvcc is part of this project's build machines and CI: without it this lane fails (it is not skipped).
pytestmark = [pytest.mark.compile]


def _nvcc_cmd(src: str, obj: str) -> list[str]:
    includes = [f"-I{p}" for p in include_paths()]
    defines = ["-DCKPT_EXT_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    return [NVCC, "-c", "-arch=sm_90", "-std=c++20", "-O1", *defines, "-Xcompiler", "-fPIC", *includes, src, "-o", obj]


def test_there_are_cuda_sources():
    names = {os.path.basename(p) for p in CU_FILES}
    expected = {"layer_norm_cuda.cu", "gelu_cuda.cu", "dropout_cuda.cu", "ffn_cuda.cu"}
    expected |= {"rms_norm_cuda.cu", "swiglu_cuda.cu", "rope_cuda.cu"}  # the Llama-family ops
    expected |= {"gated_cuda.cu"}  # the plain SwiGLU and GeGLU (Gemma, ModernBERT) pointwise ops
    assert expected <= names


def _impls(pattern: str) -> set[str]:
    names = set()
    for path in glob.glob(os.path.join(ROOT, "csrc", pattern)):
        with open(path) as f:
            names |= set(re.findall(r'm\.impl\("(\w+)"', f.read()))
    return names


# CPU-only helper ops: aten_attention's cpu_gqa route calls them on CPU tensors only (CUDA attention takes aten's
# flash kernel or the Triton kernels); they are not graph-op kernels (no ``_kernel`` suffix, so check-cuda skips them).
CPU_ONLY = {"cpu_gqa_attention_fwd", "cpu_gqa_attention_bwd"}


def test_every_cpu_kernel_has_a_cuda_kernel_in_the_sources():
    """What `make check-cuda` checks on the built extension, read from the sources so it runs on every machine."""
    cpu, cuda = _impls("cpu/*.cpp"), _impls("cuda/*.cu")
    assert "rms_norm_bwd_kernel" in cpu and "swiglu_ffn_recompute_kernel" in cpu and "geglu_bwd_kernel" in cpu
    assert CPU_ONLY <= cpu and not any(name.endswith("_kernel") for name in CPU_ONLY)
    missing = cpu - cuda - CPU_ONLY
    assert not missing, f"kernel ops with a CPU kernel but no CUDA kernel: {sorted(missing)}"


def test_every_cu_file_compiles_for_sm90(tmp_path):
    def compile_one(src):
        obj = tmp_path / (os.path.basename(src) + ".o")
        proc = subprocess.run(_nvcc_cmd(src, str(obj)), capture_output=True, text=True, timeout=400)
        return src, proc.returncode, proc.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, CU_FILES))
    failures = [f"{os.path.relpath(src, ROOT)}:\n{err[-3000:]}" for src, rc, err in results if rc != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
