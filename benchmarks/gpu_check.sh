#!/usr/bin/env bash
# Everything a lent GPU should run, in one call (the device tool's budget is minutes):
# build with the CUDA kernels, the self-check, the gpu-marked tests, compute-sanitizer
# memcheck on the self-check, and the benchmarks at the docs/design.md "Performance" shapes. Results (logs,
# results CSV, plots) go under $OUT, to be brought back and committed.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repo root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/attnpool_gpu}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

echo "== build (CUDA sm_${ATTNPOOL_CUDA_ARCHS:-90})"
export ATTNPOOL_FORCE_CUDA=1 ATTNPOOL_CUDA_ARCHS=${ATTNPOOL_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
if ! python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi

echo "== self-check"
python -m attnpool --device cuda 2>&1 | tee "$OUT/selfcheck.txt"

echo "== gpu tests"
python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/tests_gpu.txt" | tail -15

echo "== compute-sanitizer memcheck (self-check without timing)"
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 python -m attnpool --device cuda \
    --no-timing > "$OUT/memcheck.txt" 2>&1
  echo "memcheck rc $?" | tee -a "$OUT/memcheck.txt"
else
  echo "compute-sanitizer not found" | tee "$OUT/memcheck.txt"
fi

echo "== benchmarks"
python benchmarks/run_all.py --device cuda 2>&1 | tee "$OUT/bench.txt" | grep "the better"
cp benchmarks/results/*.csv benchmarks/results/*.png "$OUT"/ 2>/dev/null
echo "results in $OUT"
