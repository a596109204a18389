#!/usr/bin/env bash
# Everything a GPU session checks, in two device calls (the device tool allows 10 min per call; a fresh machine
# per call, so each stage builds):
#   figures  build, then the GPU figures of issues 3 and 4, each benchmark under its own time cap
#            (benchmarks/run_gpu_figures.sh: sparse GEMV vs cuBLAS, ops vs copy bandwidth, SparseGPT on one
#            large layer, compiled end-to-end decode of a Llama-3-8B-shaped model)
#   tests    build, the gpu-marked tests on the CUDA C++ path and again on the Triton path (CUDA extension
#            disabled), then the sparse GEMV edge cases under compute-sanitizer memcheck
# Usage on the GPU machine, from the repo root:  bash benchmarks/run_gpu_session.sh figures|tests [OUT_DIR]
# Results (markdown / CSV / JSON with device, versions, date, and a log) land in OUT_DIR (default: $OUT, else
# benchmarks/results). Each stage ends well inside 10 minutes; caps are set by the *_S variables.
set -uo pipefail
stage=${1:-}
out=${2:-${OUT:-benchmarks/results}}
case "$stage" in
  figures) exec bash "$(dirname "$0")/run_gpu_figures.sh" "$out" ;;
  tests) ;;
  *) echo "usage: bash benchmarks/run_gpu_session.sh figures|tests [OUT_DIR]" >&2; exit 2 ;;
esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
deadline=$((SECONDS + ${TOTAL_S:-570}))  # the device call ends at 600 s; the caps alone add up to more
cap() { local left=$((deadline - SECONDS - 10)); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || nvidia-smi -L
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  t0=$SECONDS
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    timeout ${BUILD_S:-200} python -m pip install -q -e . --no-build-isolation --no-deps || echo "BUILD FAILED (rc $?)"
  echo "build: $((SECONDS - t0)) s"
  python -m sparsekit.info
  # pytest-xdist (on the GPU image) spreads the tests, and above all their Triton compiles, over 8 processes;
  # a cap sends SIGINT first, so pytest still prints its summary of failures
  xdist=$(python -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-8}")
  echo "== GPU tests, CUDA C++ path"; t0=$SECONDS
  timeout -s INT -k 20 $(cap ${TESTS_S:-150}) python -m pytest -q -m gpu tests/ -p no:cacheprovider $xdist \
    --maxfail 25 --timeout 60 -rfE || echo "TESTS (CUDA C++) rc $?"
  echo "tests: $((SECONDS - t0)) s"
  echo "== GPU tests, Triton path (CUDA extension disabled)"; t0=$SECONDS
  SPARSEKIT_DISABLE_EXTENSIONS=1 timeout -s INT -k 20 $(cap ${TESTS_S:-150}) python -m pytest -q -m gpu tests/ \
    -p no:cacheprovider $xdist --timeout 60 -rfE || echo "TESTS (Triton) rc $?"
  echo "tests: $((SECONDS - t0)) s"
  echo "== edge cases under compute-sanitizer memcheck (capped)"
  san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [[ -x "$san" ]]; then
    # no caching allocator: its 2 MiB blocks pack small tensors together, so an access past one lands in memory
    # memcheck counts as valid; with each tensor its own cudaMalloc, memcheck sees the overrun
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 20 $(cap ${MEMCHECK_S:-150}) "$san" --tool memcheck --error-exitcode 1 \
      python benchmarks/gpu_memcheck_cases.py || echo "MEMCHECK FAILED OR TIMED OUT (rc $?)"
  else
    python benchmarks/gpu_memcheck_cases.py || echo "EDGE CASES FAILED"
  fi
} 2>&1 | tee "$out/gpu_tests.log"
