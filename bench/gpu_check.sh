#!/usr/bin/env bash
# The first-GPU-run check, one command, <= 8 minutes on one H100/H200, no network:
#   1. build the package (CUDA kernels too when torch has CUDA)      2. the test suite's CUDA lane (fp32/fp16/bf16)
#   3. each Triton kernel vs torch eager (GB/s, TFLOP/s, % of ceilings)   4. the block per variant, side by side
#   5. a Llama-3-8B-shaped transformers LlamaDecoderLayer per variant (HF eager, torch checkpoint, HF gradient
#      checkpointing, Liger-Kernel if installed, ckpt_ext policies, compile reduce-overhead): parity, ms, peak memory
#   6. a BERT-base transformers BertLayer on a right-padded B=32, T=512 batch per variant (the same columns)
#   The CUDA lane includes tests/test_cuda_backend.py: the csrc/cuda kernels (backend "cuda") against the reference.
# Results (CSV + markdown, logs) go to $OUT if set, else bench/results/. Every stage has a timeout; a failing stage
# is recorded in summary.md and the script goes on, exiting non-zero at the end if any stage failed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The interpreter: $PYTHON, else the first of python3 / .venv/bin/python whose torch sees a GPU, else one with torch.
pick_python() {
  local probe cand
  for probe in "import torch, sys; sys.exit(not torch.cuda.is_available())" "import torch"; do
    for cand in python3 .venv/bin/python; do
      if command -v "$cand" > /dev/null && timeout 60 "$cand" -c "$probe" 2> /dev/null; then
        echo "$cand"
        return
      fi
    done
  done
  echo python3
}
PY="${PYTHON:-$(pick_python)}"
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export OUT
export TRITON_INTERPRET=0
SUMMARY="$OUT/summary.md"
failed=0

{
  echo "# ckpt_ext GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  "$PY" - <<'PYEOF'
import torch
print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
try:
    import triton
    print(f"- triton {triton.__version__}")
except ImportError:
    print("- triton not installed")
PYEOF
  echo
} > "$SUMMARY"

stage() {  # stage NAME TIMEOUT_S CMD...: run with a timeout, log to $OUT/NAME.log, record the outcome
  local name="$1" limit="$2"
  shift 2
  local start rc=0
  start=$(date +%s)
  echo "== $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  tail -n 15 "$OUT/$name.log"
  local secs=$(( $(date +%s) - start ))
  if [ "$rc" -eq 0 ]; then
    echo "- $name: ok (${secs}s)" >> "$SUMMARY"
  else
    echo "- $name: FAILED rc=$rc (${secs}s), see $name.log" >> "$SUMMARY"
    failed=1
  fi
}

has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$has_cuda" = "1" ]; then
  export CKPT_EXT_BUILD_CUDA=1
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}"
  export TORCH_CUDA_ARCH_LIST
  MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  export MAX_JOBS
fi

if [ "$has_cuda" != "1" ]; then
  echo "- no CUDA device visible: tests on CUDA and GPU timings skipped, nothing built (hardware limit)" >> "$SUMMARY"
  cat "$SUMMARY"
  exit 1
fi

PIP_INSTALL=("$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .)
stage build 150 "${PIP_INSTALL[@]}"
if ! "$PY" -c "import ckpt_ext.kernels" 2> /dev/null; then  # CUDA build failed: CPU-only extension, same package map
  stage build_cpu_only 120 env CKPT_EXT_BUILD_CUDA=0 "${PIP_INSTALL[@]}"
fi

stage tests_cuda 170 env CKPT_EXT_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -m cuda -p no:cacheprovider --durations=10 tests
stage gpu_kernels 75 "$PY" -m bench.gpu_kernels --device cuda
stage gpu_block 75 "$PY" -m bench.gpu_block --device cuda
stage gpu_attention 60 "$PY" -m bench.gpu_attention --device cuda
stage gpu_llama 120 "$PY" -m bench.gpu_llama --device cuda
stage gpu_bert 90 "$PY" -m bench.gpu_bert --device cuda

for part in gpu_kernels gpu_block gpu_attention gpu_llama gpu_bert; do
  if [ -f "$OUT/$part.md" ]; then
    { echo; cat "$OUT/$part.md"; } >> "$SUMMARY"
  fi
done
echo
cat "$SUMMARY"
exit "$failed"
