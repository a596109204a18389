#!/usr/bin/env bash
# The GPU figures of issues 3 and 4 in one device call (build, then each benchmark under its own time cap):
# sparse GEMV vs cuBLAS, the ops vs copy bandwidth, SparseGPT on one large layer, end-to-end compiled decode.
# The tests and the memcheck cases are in run_gpu_session.sh.
# Usage on the GPU machine, from the repo root:  bash benchmarks/run_gpu_figures.sh OUT_DIR
set -uo pipefail
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the benchmarks import sparsekit even if the build fails
deadline=$((SECONDS + ${TOTAL_S:-570}))  # the device call ends at 600 s; the caps alone add up to more
cap() { local left=$((deadline - SECONDS - 10)); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  t0=$SECONDS
  { TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
      timeout ${BUILD_S:-200} python -m pip install -q -e . --no-build-isolation --no-deps \
      || echo "BUILD FAILED (rc $?)"; } 2>&1 | grep -v "^ *$" | tail -40
  echo "build: $((SECONDS - t0)) s"
  python -m sparsekit.info
  echo "== sparse GEMV vs cuBLAS"; t0=$SECONDS
  timeout $(cap ${GEMV_S:-170}) python benchmarks/bench_sparse_gemv_gpu.py --out "$out" ${GEMV_ARGS:-} || echo "GEMV rc $?"
  echo "gemv: $((SECONDS - t0)) s"
  echo "== ops vs copy bandwidth"; t0=$SECONDS
  timeout $(cap ${OPS_S:-45}) python benchmarks/bench_ops_gpu.py --out "$out" --rep 100 || echo "OPS rc $?"
  rm -f "$out"/bench_ops_gpu.csv  # the .md holds the same rows; at most 8 files come back
  echo "ops: $((SECONDS - t0)) s"
  echo "== SparseGPT"; t0=$SECONDS
  timeout $(cap ${SGPT_S:-45}) python benchmarks/bench_sparsegpt_gpu.py --out "$out" --repeats 3 || echo "SPARSEGPT rc $?"
  rm -f "$out"/sparsegpt_gpu.csv
  echo "sparsegpt: $((SECONDS - t0)) s"
  echo "== decode"; t0=$SECONDS
  timeout $(cap ${DECODE_S:-170}) python benchmarks/bench_decode_gpu.py --out "$out" ${DECODE_ARGS:---sparse-max-rows 64 --new-tokens 64 --no-cslt} || echo "DECODE rc $?"
  echo "decode: $((SECONDS - t0)) s"
} 2>&1 | tee "$out/figures.log"
