"""The CPU kernels' ISA-specific code compiles for every CKPT_EXT_CPU_ISA level, not only the one this machine builds.

setup.py compiles csrc/cpu for the widest ISA the building CPU has (here avx512_bf16), so the other paths of
csrc/cpu/gelu_vec.h and vec_io.h (inline AVX512 exp, AVX512_BF16 stores, AVX2 and generic fallbacks) would otherwise
never be compiled. g++ -fsyntax-only on the two kernels that include both headers, per level, two at a time (~25 s).
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
CXX = shutil.which("g++")

pytestmark = [pytest.mark.compile, pytest.mark.skipif(CXX is None, reason="g++ not found")]


def _isa_flags() -> dict:
    """setup.py's ISA_FLAGS table, read from its source (importing setup.py would run setup())."""
    path = os.path.join(ROOT, "setup.py")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    scope: dict = {}
    exec(compile(text[text.index("AVX512_FLAGS = ") : text.index("def _isa_decision")], path, "exec"), scope)
    return scope["ISA_FLAGS"]


def test_every_level_is_checked():
    assert set(_isa_flags()) == {"avx512_bf16", "avx512", "avx2", "default"}


@pytest.mark.parametrize("isa", ["avx512", "avx2", "default"])
def test_cpu_kernels_compile_for_isa(isa):
    flags = _isa_flags()[isa]
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]

    def check(src):
        cmd = [CXX, "-std=c++20", "-fsyntax-only", "-fopenmp", *flags, *includes, os.path.join(ROOT, src)]
        return src, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for src, res in pool.map(check, SOURCES):
            assert res.returncode == 0, f"{src} for {isa}:\n{res.stderr[-3000:]}"
