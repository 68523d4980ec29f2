#!/usr/bin/env bash
# The one script to run when an issue is lent a GPU machine (shared/DESIGN.md section 7).
# Budget: under 6 minutes on an H100/H200 with 16 cores. Everything it measures lands in $OUT:
#   build.log  info.txt  tests.log  sanitizer.log  bench.log  vq.jsonl  sampling.jsonl  masking.jsonl  train.jsonl
#   generate.jsonl  data.jsonl
# (tests marked slow -- long statistical ones, pure CPU -- run in CI, not here)
# Commit the JSONL rows it returns into bench/results/.
#
# Without a GPU (no nvidia-smi or no visible device) it dry-runs: same build for sm_90 only, the
# test suite (CUDA tests skip), no sanitizer, and a quick CPU benchmark that is not saved.
#
#   device tool: run(command="bash bench/device_check.sh", timeout_s=480)
#   here:        OUT=/tmp/dc bash bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
stamp() { echo "[device_check +$(( $(date +%s) - start ))s] $*"; }
status=0

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
stamp "GPU present: $gpu; python: $($PY -c 'import sys, torch; print(sys.version.split()[0], torch.__version__)')"

stamp "build (sm_90 only)"
if ! FOURM_FAST_CUDA=1 FOURM_FAST_CUDA_ARCHS=9.0 MAX_JOBS=$(nproc) CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} \
    $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  stamp "BUILD FAILED (tail of build.log follows)"; tail -40 "$OUT/build.log"; exit 1
fi
$PY -m fourm_fast info >"$OUT/info.txt" 2>&1; cat "$OUT/info.txt"

stamp "tests (CUDA tests against the CPU twin and the float64 reference)"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests -x -rs -m "not slow" >"$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log"

if [ "$gpu" = 1 ] && command -v compute-sanitizer >/dev/null 2>&1; then
  stamp "compute-sanitizer memcheck on small cases of every kernel"
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 $PY bench/sanitize_cases.py \
    >"$OUT/sanitizer.log" 2>&1 || status=1
  tail -3 "$OUT/sanitizer.log"
else
  echo "compute-sanitizer skipped (gpu=$gpu)" >"$OUT/sanitizer.log"
fi

stamp "benchmarks"
if [ "$gpu" = 1 ]; then
  export FOURM_FAST_RESULTS_DIR="$OUT"
  { timeout 120 $PY bench/bench_vq.py --device cuda --dtype float32 --max-baseline-gib 24 &&
    timeout 90 $PY bench/bench_vq.py --device cuda --dtype bfloat16 --max-baseline-gib 24 &&
    timeout 90 $PY bench/bench_sampling.py --device cuda &&
    timeout 60 $PY bench/bench_masking.py --device cuda &&
    timeout 120 $PY bench/bench_train.py --device cuda --preset B --batch 64 --repeats 10 &&
    timeout 60 $PY bench/bench_generate.py --device cuda --quick &&
    timeout 60 $PY bench/bench_data.py --device cuda --sizes 224 --n 128 --repeats 2; } >"$OUT/bench.log" 2>&1 || status=1
else
  { timeout 300 $PY bench/bench_vq.py --quick --no-save &&
    timeout 300 $PY bench/bench_sampling.py --quick --no-save &&
    timeout 120 $PY bench/bench_masking.py --quick --no-save &&
    timeout 300 $PY bench/bench_train.py --quick --no-save --repeats 2 &&
    timeout 120 $PY bench/bench_generate.py --quick --no-save --no-reference; } >"$OUT/bench.log" 2>&1 || status=1
fi
cat "$OUT/bench.log"
stamp "done, status $status"
exit $status
