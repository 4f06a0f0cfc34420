#!/usr/bin/env bash
# `make check-cuda`: build ckpt_ext._C with its CUDA kernels (sm_90) against a CUDA torch and check that every kernel
# op with a CPU kernel also has a CUDA kernel registered. Needs nvcc 13 but no GPU.
#   1. a private venv (build/cuda-venv, git-ignored; CKPT_EXT_CUDA_VENV overrides) with torch==2.14.1 (local cu130
#      wheel, ~4 min and 5.5 GB the first time), setuptools, wheel, ninja;
#   2. a copy of the source tree (so the in-place CPU build of the main checkout is untouched) built with
#      CKPT_EXT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 and installed (non-editable) into that venv;
#   3. from outside the tree: cuda_version() >= 0 and, for every ckpt_ext::*_kernel op, a CUDA kernel wherever there is
#      a CPU kernel (torch._C._dispatch_has_kernel_for_dispatch_key).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CKPT_EXT_CUDA_VENV:-$ROOT/build/cuda-venv}
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/ckpt_ext_cuda.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.__version__.startswith('2.14.1') and torch.version.cuda else 1)" 2>/dev/null; then
  echo "check-cuda: installing torch==2.14.1 (CUDA) into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel ninja
  "$VENV/bin/pip" install -q "torch==2.14.1"
fi

tar -C "$ROOT" --exclude=./.venv --exclude=./.venv-tf5 --exclude=./build --exclude=./.git --exclude='*.so' -cf - . | tar -C "$WORK" -xf -
echo "check-cuda: building the CUDA extension in $WORK"
if ! (cd "$WORK" && CKPT_EXT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
  "$VENV/bin/pip" install -v --no-build-isolation --no-deps . >"$WORK/build.log" 2>&1); then
  tail -60 "$WORK/build.log"
  echo "check-cuda: FAILED to build the CUDA extension"
  exit 1
fi
grep -E "ckpt_ext setup" "$WORK/build.log" || true

cd /tmp
"$VENV/bin/python" - <<'PY'
import sys

import torch
import ckpt_ext._C  # noqa: F401  (runs the TORCH_LIBRARY registrations)

version = int(torch.ops.ckpt_ext.cuda_version())
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ckpt_ext::") and n.endswith("_kernel"))
has = torch._C._dispatch_has_kernel_for_dispatch_key
cpu_ops = [n for n in ops if has(n, "CPU")]
missing = [n for n in cpu_ops if not has(n, "CUDA")]
print(f"check-cuda: cuda_version()={version}; kernel ops with a CPU kernel: {len(cpu_ops)}; missing CUDA: {missing}")
if version < 0 or not cpu_ops or missing:
    sys.exit("check-cuda: FAILED")
print("check-cuda: OK")
PY
