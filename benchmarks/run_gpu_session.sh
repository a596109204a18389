#!/usr/bin/env bash
# Everything a GPU session checks, in one call (the device tool allows ~10 min per call):
#   build the extensions against the machine's torch, print the live backends, run the GPU tests on the
#   CUDA C++ path and again on the Triton path (CUDA extension disabled), then the GPU benchmarks (ops against
#   copy bandwidth; sparse GEMV against cuBLAS), then edge cases of the sparse GEMVs under compute-sanitizer.
# Usage on the GPU machine, from the repo root:  bash benchmarks/run_gpu_session.sh [OUT_DIR]
# Results (CSV + markdown with device, versions, date) land in OUT_DIR (default: $OUT, else benchmarks/results).
set -uo pipefail
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/gpu_session.log"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || nvidia-smi -L
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  MAX_JOBS=${MAX_JOBS:-16} pip install -q -e . --no-build-isolation --no-deps || echo "BUILD FAILED"
  python -m sparsekit.info
  echo "== GPU tests, CUDA C++ path"
  python -m pytest -q -m gpu tests/ -p no:cacheprovider
  echo "== GPU tests, Triton path (CUDA extension disabled)"
  SPARSEKIT_DISABLE_EXTENSIONS=1 python -m pytest -q -m gpu tests/ -p no:cacheprovider
  echo "== benchmarks"
  python benchmarks/bench_ops_gpu.py --out "$out"
  python benchmarks/bench_sparse_gemv_gpu.py --out "$out"
  echo "== edge cases under compute-sanitizer memcheck (last: slow under the sanitizer; capped at 4 min)"
  san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [[ -x "$san" ]]; then
    timeout 240 "$san" --tool memcheck --error-exitcode 1 python benchmarks/gpu_memcheck_cases.py \
      || echo "MEMCHECK FAILED OR TIMED OUT (rc $?)"
  else
    python benchmarks/gpu_memcheck_cases.py || echo "EDGE CASES FAILED"
  fi
} 2>&1 | tee "$log"
