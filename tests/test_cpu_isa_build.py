"""The CPU kernels' ISA-specific code compiles for every CKPT_EXT_CPU_ISA level, not only the one this machine builds.

setup.py compiles csrc/cpu for the widest ISA the building CPU has, so the other paths of
csrc/cpu/gelu_vec.h and vec_io.h (inline AVX512 exp, AVX512_BF16 stores, AVX2 and generic fallbacks) would otherwise
never be compiled. g++ -fsyntax-only on the two kernels that include both headers, per level, two at a time (~35 s);
no CPU feature is needed to compile. Also: setup.py's OpenMP runtime detection names the runtime torch really loads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("csrc/cpu/gelu_cpu.cpp", "csrc/cpu/ffn_cpu.cpp")
CXX = shutil.which("g++") or "g++"

pytestmark = [pytest.mark.compile]  # g++ builds _C itself, so it is always there where these tests run


LEVELS = ["avx512_bf16", "avx512", "avx2", "default"]


def _setup_module() -> dict:
    """setup.py's definitions without its final setup() call (which would build)."""
    path = os.path.join(ROOT, "setup.py")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    scope: dict = {"__file__": path}
    exec(compile(text[: text.index("\nsetup(")], path, "exec"), scope)
    return scope


def test_every_level_is_checked():
    assert list(_setup_module()["ISA_FLAGS"]) == LEVELS


def test_openmp_runtime_detection_matches_the_loaded_one():
    """setup.py finds the OpenMP runtime torch loaded (here GNU's, the copy in torch/lib) and links accordingly."""
    import torch

    setup = _setup_module()
    name, path = setup["_torch_openmp_runtime"]()
    assert name == "libgomp.so" and os.path.isfile(path), (name, path)
    assert "parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert setup["_parallel_flags"]()[:2] == (["-fopenmp"], ["-fopenmp"])


@pytest.mark.parametrize("isa", LEVELS)
def test_cpu_kernels_compile_for_isa(isa):
    flags = _setup_module()["ISA_FLAGS"][isa]
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]

    def check(src):
        cmd = [CXX, "-std=c++20", "-fsyntax-only", "-fopenmp", *flags, *includes, os.path.join(ROOT, src)]
        return src, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for src, res in pool.map(check, SOURCES):
            assert res.returncode == 0, f"{src} for {isa}:\n{res.stderr[-3000:]}"
