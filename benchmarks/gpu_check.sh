#!/usr/bin/env bash
# Everything a lent GPU should run, in one call of at most BUDGET seconds (default 540),
# the most needed first, and every timing with nothing else running:
#   A. while the extension builds in the background (sm_90 only): the copy bandwidth; the
#      gpu-marked Triton tests, and beside them a warm-up of torch.compile and Triton at the
#      benchmark shapes (their caches make the timed runs' compiles short);
#   B. once attnpool._C is built: the self-check, then together the gpu-marked CUDA tests and
#      compute-sanitizer memcheck and racecheck on the self-check's small cases (every CUDA and
#      Triton kernel, forward and backward);
#   T. the benchmarks: eager, compile, Triton and CUDA timed against each other, per op;
#   D. with the time left, the sweeps (eager, Triton, CUDA; a compile per swept shape would
#      not fit).
# Each stage has a deadline, so the script ends inside BUDGET whatever hangs. Under $OUT:
# summary.txt (the short report, also printed last), logs.tgz (every log), the results CSV,
# and the extension (_C.*.so) for a rerun that changes no C++/CUDA.
#
#   bash benchmarks/gpu_check.sh [BUDGET]      # on the GPU machine, from the repo root
# With SKIP_BUILD=1 an attnpool/_C.*.so carried along is used as it is. A short rerun after a
# fix: BENCH=attention_cluster (one script; no compile warm-up, no T stage; its sweep with
# BENCH_PROVIDERS, default eager,attnpool-cuda,attnpool-triton), or BENCH=none; TUNE=1 adds
# the Triton tile sweep of benchmarks/gpu_tune.py (TUNE_OPS="--op cluster", say).
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-540}
OUT=${OUT:-/tmp/attnpool_gpu}
LOG=$OUT/logs
mkdir -p "$LOG"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 ATTNPOOL_NO_JIT=1
say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - SECONDS - 25)); }  # 25 s kept for packing the results
# run NAME LIMIT CMD...: at most min(LIMIT, time left) seconds, output in $LOG/NAME.txt
run() {
  local name=$1 limit=$2 t
  shift 2
  t=$(left)
  ((t < limit)) && limit=$t
  if ((limit < 10)); then say "-- $name: skipped, no time left"; return 124; fi
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" > "$LOG/$name.txt" 2>&1
  local rc=$?
  say "-- $name: rc $rc, $((SECONDS - t0)) s (limit $limit s)"
  return $rc
}

{
  nvidia-smi
  nvidia-smi -q -d CLOCK,POWER,PERFORMANCE
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__); print(torch.cuda.get_device_properties(0))"
  nvcc --version
  lscpu | head -20
} > "$LOG/machine.txt" 2>&1
say "== $(python -c 'import torch, triton; print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)' 2>&1)"

# -- the package (pure Python first: the tests and Triton need no extension)
run install 120 env ATTNPOOL_SKIP_EXT=1 python -m pip install --no-build-isolation --no-deps -e . \
  || { tail -30 "$LOG/install.txt"; }
if [[ "${SKIP_BUILD:-0}" == 1 ]] && ls attnpool/_C.*.so > /dev/null 2>&1; then
  say "-- build: skipped, using $(ls attnpool/_C.*.so)"
  BUILD_PID=
else
  rm -f attnpool/_C.*.so
  (ATTNPOOL_FORCE_CUDA=1 ATTNPOOL_CUDA_ARCHS=90 MAX_JOBS=12 timeout -k 5 $(($(left) - 30)) \
    python setup.py build_ext --inplace > "$LOG/build.txt" 2>&1; echo "build rc $?" >> "$LOG/build.txt") &
  BUILD_PID=$!
fi

# -- A: copy bandwidth, Triton tests, compile warm-up (the build holds most cores meanwhile)
run bandwidth 60 python -c "
import torch, sys; sys.path.insert(0, 'benchmarks'); import harness
d = torch.device('cuda'); print(f'copy bandwidth {harness.copy_bandwidth_gbs(d):.0f} GB/s (1 GiB)')
print(f'copy bandwidth {harness.copy_bandwidth_gbs(d, 4096):.0f} GB/s (4 GiB)')"
cat "$LOG/bandwidth.txt" >> "$SUMMARY"
warm() {
  for s in benchmarks/bench_*.py; do
    run "warm_$(basename "$s" .py)" 60 python "$s" --device cuda --no-write \
      --providers compile,attnpool-triton
  done
}
BENCH=${BENCH:-all}
BENCH_PROVIDERS=${BENCH_PROVIDERS:-eager,attnpool-cuda,attnpool-triton}
if [[ "$BENCH" == all ]]; then warm & WARM_PID=$!; else WARM_PID=; fi
# four workers where pytest-xdist is installed: the tests' Triton compiles are host-bound
XDIST=$(python -c "import xdist" 2> /dev/null && echo "-n 4")
run tests_triton 200 python -m pytest -q $XDIST -m gpu -k triton -p no:cacheprovider tests
tail -3 "$LOG/tests_triton.txt" >> "$SUMMARY"
[[ -n "$WARM_PID" ]] && wait $WARM_PID

# -- B: the CUDA kernels
if [[ -n "$BUILD_PID" ]]; then
  say "-- waiting for the build"
  while kill -0 "$BUILD_PID" 2> /dev/null && (($(left) > 60)); do sleep 2; done
  tail -1 "$LOG/build.txt" | tee -a "$SUMMARY"
fi
if ls attnpool/_C.*.so > /dev/null 2>&1; then
  run selfcheck 90 python -m attnpool --device cuda
  grep -E "parity|time fwd|checks|Error" "$LOG/selfcheck.txt" | head -40 >> "$SUMMARY"
  # the sanitizers see every allocation only without the caching allocator
  SAN="compute-sanitizer --error-exitcode 9 --print-limit 20"
  run tests_cuda 150 python -m pytest -q $XDIST -m gpu -k cuda -p no:cacheprovider tests &
  P1=$!
  run memcheck 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SAN --tool memcheck \
    python -m attnpool --device cuda --no-timing &
  P2=$!
  run racecheck 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SAN --tool racecheck \
    python -m attnpool --device cuda --no-timing &
  P3=$!
  wait $P1 $P2 $P3
  tail -3 "$LOG/tests_cuda.txt" >> "$SUMMARY"
  for t in memcheck racecheck; do grep -E "ERROR SUMMARY|Invalid|Race|hazard" "$LOG/$t.txt" \
    | head -8 >> "$SUMMARY"; done
  cp attnpool/_C.*.so "$OUT"/
else
  say "-- no attnpool/_C built: see build.txt"
  tail -25 "$LOG/build.txt" >> "$SUMMARY"
fi

# -- T: the benchmarks, every provider of an op timed against the others; D: the sweeps
if [[ "$BENCH" == all ]]; then
  for s in benchmarks/bench_*.py; do
    run "T_$(basename "$s" .py)" 100 python "$s" --device cuda
  done
fi
for s in benchmarks/bench_*.py; do
  n=$(basename "$s" .py)
  [[ "$BENCH" == all || "$n" == "bench_$BENCH" ]] || continue
  run "D_$n" 90 python "$s" --device cuda --sweep --providers "$BENCH_PROVIDERS"
done
# TUNE=1: the Triton tile configurations (benchmarks/gpu_tune.py), with the time left
if [[ "${TUNE:-0}" == 1 ]]; then
  run tune 600 python benchmarks/gpu_tune.py ${TUNE_OPS:-}
  grep " ms " "$LOG/tune.txt" | sort -k1,1 -k2,2n | awk '!seen[$1]++ {print "fastest:", $0}' \
    >> "$SUMMARY"
fi

# -- results
cp benchmarks/results/NVIDIA*.csv "$OUT"/ 2>/dev/null
grep -h "copy bandwidth\|floor probes\|the better" "$LOG"/[TD]_bench_*.txt >> "$SUMMARY" 2>/dev/null
python benchmarks/table.py --gpu 2>/dev/null >> "$SUMMARY"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOG"
say "== done in $SECONDS s"
cat "$SUMMARY"
