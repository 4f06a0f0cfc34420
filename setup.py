"""Build ckpt_ext._C: the C++ CPU kernels always, the CUDA kernels (csrc/cuda/*.cu) when CKPT_EXT_BUILD_CUDA allows.

CKPT_EXT_BUILD_CUDA = auto (default): CUDA when torch is a CUDA build and nvcc's major version equals torch's CUDA
                      major; 1: force (fails with the reason; TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" when no GPU is
                      visible); 0: CPU only.
CKPT_EXT_CPU_ISA    = auto (default): compile the CPU kernels' at::vec code for the widest of avx512_bf16 / avx512 /
                      avx2 the building x86-64 CPU supports (as ATen dispatches at run time); or force one | default.
at::parallel_for is header code: its threads exist only when the extension is compiled and linked with the same
threading runtime as torch (OpenMP: -fopenmp, linked against the runtime libtorch_cpu uses; libgomp's soname resolves
to the copy torch has loaded), else every kernel runs on one thread. The pip wheel of the CUDA toolkit
(site-packages/nvidia/cu13/{include,lib}) is added when present. One abi3 module, no pybind11. Build with
`pip install --no-build-isolation -e .` into an environment that already has torch and ninja.
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
LIMITED_API = "-DPy_LIMITED_API=0x03090000"


def _log(msg):
    print(f"ckpt_ext setup: {msg}", file=sys.stderr)


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _env(name, default="auto"):
    value = os.environ.get(name, default).strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be auto, 0 or 1, got {value!r}")
    return value


def _nvidia_pip_dirs():
    """site-packages/nvidia/cu13/{include,lib} of the pip CUDA wheels, when they exist."""
    base = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13")
    return [p for p in (os.path.join(base, "include"), os.path.join(base, "lib")) if os.path.isdir(p)]


def _cudart_dir():
    """A folder with the unversioned libcudart.so that CUDAExtension's -lcudart needs: the pip wheel ships only
    libcudart.so.13, and CUDA_HOME may be a wrapper's prefix (nvcc in /usr/local/bin -> CUDA_HOME=/usr/local)."""
    from torch.utils.cpp_extension import CUDA_HOME

    roots = [CUDA_HOME] if CUDA_HOME else []
    nvcc = _nvcc()
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    roots += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in roots:
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            if os.path.exists(os.path.join(root, sub, "libcudart.so")):
                return os.path.join(root, sub)
    return None


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [os.path.join(CUDA_HOME, "bin", "nvcc")] if CUDA_HOME else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _nvcc_major(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return int(match.group(1)) if match else None


def _cuda_decision():
    """(build_cuda, reason)."""
    mode = _env("CKPT_EXT_BUILD_CUDA")
    if mode == "0":
        return False, "CKPT_EXT_BUILD_CUDA=0"
    problem = None
    nvcc = _nvcc()
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    elif nvcc is None:
        problem = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    else:
        torch_major, nvcc_major = int(torch.version.cuda.split(".")[0]), _nvcc_major(nvcc)
        if nvcc_major != torch_major:
            problem = f"nvcc {nvcc} is CUDA {nvcc_major}, torch was built with CUDA {torch.version.cuda}"
    if problem is None:
        return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}) and {nvcc} match"
    if mode == "1":
        raise SystemExit(f"ckpt_ext setup: CKPT_EXT_BUILD_CUDA=1 but the CUDA kernels cannot be built: {problem}")
    return False, problem


AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
AVX512_DEFS = ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
ISA_FLAGS = {
    # avx512 + the AVX512_BF16 conversions: fp32 -> bf16 stores in one instruction (vcvtne2ps2bf16, round to nearest
    # even; subnormals flush to ±0).
    "avx512_bf16": AVX512_FLAGS + ["-mavx512bf16"] + AVX512_DEFS + ["-DCKPT_EXT_AVX512_BF16"],
    "avx512": AVX512_FLAGS + AVX512_DEFS,
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": [],
}
_AVX512_NEEDS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"}
ISA_NEEDS = {"avx512_bf16": _AVX512_NEEDS | {"avx512_bf16"}, "avx512": _AVX512_NEEDS, "avx2": {"avx2", "fma", "f16c"}}


def _isa_decision():
    """(isa, reason): the at::vec instruction set the CPU kernels are compiled for."""
    mode = os.environ.get("CKPT_EXT_CPU_ISA", "auto").strip().lower()
    if mode in ISA_FLAGS:
        return mode, f"CKPT_EXT_CPU_ISA={mode}"
    if mode != "auto":
        raise SystemExit(f"CKPT_EXT_CPU_ISA must be auto, {', '.join(ISA_FLAGS)}; got {mode!r}")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default", f"{platform.machine()} is not x86-64"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.findall(r"\w+", next((line for line in f if line.startswith("flags")), "")))
    except OSError:
        return "default", "cannot read /proc/cpuinfo"
    for isa, needs in ISA_NEEDS.items():
        if needs <= flags:
            return isa, f"the building CPU has {', '.join(sorted(needs))}"
    return "default", "the building CPU lacks AVX2/FMA/F16C"


OPENMP_RUNTIMES = ("libgomp.so", "libiomp5.so", "libomp.so")  # GNU, Intel, LLVM


def _torch_openmp_runtime():
    """(name, path) of the OpenMP runtime torch has loaded (setup.py imported torch), from /proc/self/maps; or None."""
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "/" in line})
    return next(((n, p) for n in OPENMP_RUNTIMES for p in paths if os.path.basename(p).startswith(n)), None)


def _parallel_flags():
    """(compile flags, link flags, reason) that give at::parallel_for torch's own threading runtime."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return [], [], "torch's ATen parallel backend is not OpenMP: at::parallel_for calls torch's own pool"
    if not sys.platform.startswith("linux"):
        return [], [], f"OpenMP flags are only set up for Linux; on {sys.platform} the CPU kernels run on one thread"
    runtime = _torch_openmp_runtime()
    if runtime is not None and runtime[0] == "libgomp.so":
        return ["-fopenmp"], ["-fopenmp"], f"torch uses GNU OpenMP ({runtime[1]}; libgomp's soname resolves to it)"
    if runtime is not None:
        # -fopenmp emits GOMP_* calls, which Intel's and LLVM's runtimes also export: link torch's runtime itself, so
        # that the process has one OpenMP runtime.
        return ["-fopenmp"], [runtime[1]], f"torch uses {runtime[0]} ({runtime[1]})"
    return [], [], "torch's OpenMP runtime is not loaded: the CPU kernels run on one thread"


def extensions():
    cxx = ["-O3", "-std=c++20", LIMITED_API, "-Wno-psabi", "-ffp-contract=off"]
    isa, why = _isa_decision()
    _log(f"CPU kernels for ISA {isa}: {why}")
    cxx += ISA_FLAGS[isa]
    omp_cxx, omp_link, why = _parallel_flags()
    _log(f"threading: compile {omp_cxx or 'no flags'}, link {omp_link or 'no flags'}: {why}")
    cxx += omp_cxx
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    build_cuda, why = _cuda_decision()
    _log(f"CUDA kernels {'ON' if build_cuda else 'OFF'}: {why}")
    if not build_cuda:
        return [
            CppExtension(
                "ckpt_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=omp_link, py_limited_api=True
            )
        ]

    from torch.utils.cpp_extension import CUDAExtension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    _log(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(the visible GPUs)')}")
    pip_dirs = _nvidia_pip_dirs()
    if pip_dirs:
        _log(f"adding pip CUDA dirs {pip_dirs}")
    lib_dirs = [p for p in pip_dirs if p.endswith("lib")]
    cudart = _cudart_dir()
    if cudart:
        _log(f"linking libcudart.so from {cudart}")
        lib_dirs.append(cudart)
    nvcc = ["-O3", "-std=c++20", LIMITED_API, "-DCKPT_EXT_WITH_CUDA"]
    return [
        CUDAExtension(
            "ckpt_ext._C",
            sources + _sources("csrc/cuda/*.cu"),
            include_dirs=[p for p in pip_dirs if p.endswith("include")],
            library_dirs=lib_dirs,
            extra_compile_args={"cxx": cxx + ["-DCKPT_EXT_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=omp_link,
            py_limited_api=True,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
