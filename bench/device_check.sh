#!/usr/bin/env bash
# The one script to run when an issue is lent a GPU machine (shared/DESIGN.md section 7).
#
#   device tool: run(command="FOURM_FAST_GIT_SHA=<label> bash bench/device_check.sh", timeout_s=420)
#   here:        OUT=/tmp/dc bash bench/device_check.sh          (no GPU: a dry run, nothing saved)
#
# <label> is the sha with a dirty marker, got here before the call, e.g.
# `git describe --always --dirty=+dirty` (8f3c2d1+dirty), and pasted in as text: the device's
# copy of the tree has no .git, so a $(git ...) in the command would find nothing there, and the
# rows would carry the label as given. That describe ignores untracked files (the copy includes
# them); `python -c 'from bench.utils import git_sha; print(git_sha())'` counts them too.
#
# Stages, in priority order, each bounded by its own cap and by one overall deadline
# (DEADLINE_S, default 360 s: shared/DESIGN.md asks for under 6 minutes, which leaves room in the
# 15-minute lease for the machine's start and a rerun) so the call ends inside the lease: environment, build (sm_90 only),
# the CUDA tests (GPU vs CPU twin vs float64 reference), compute-sanitizer memcheck, racecheck and
# synccheck, GPU benchmarks
# (with an Nsight Compute read of the attention kernels, bench/attention_probe.py, where ncu exists).
# SKIP_STAGES="a b" leaves the named stages out (those an earlier run of the same kernels covered).
# A stage the deadline cuts off is reported as such, never silently dropped.
#
# The device tool returns at most 8 files, so logs and JSONL rows are staged in $STAGE and packed
# into $OUT/device_check.tgz after every stage (a killed run still returns what finished).
# Unpack it and commit the *.jsonl rows into bench/results/.
#
# Only the CUDA tests run there (-k cuda): CPU tests run in CI. Tests marked slow also stay in CI.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
STAGE=${STAGE:-/tmp/fourm_fast_device_check}
rm -rf "$STAGE"; mkdir -p "$OUT" "$STAGE"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FOURM_FAST_GIT_SHA=${FOURM_FAST_GIT_SHA:-$(git describe --always --dirty=+dirty 2>/dev/null || echo unknown)}
start=$(date +%s)
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
DEADLINE_S=${DEADLINE_S:-$([ "$gpu" = 1 ] && echo 360 || echo 3600)}
stamp() { echo "[device_check +$(( $(date +%s) - start ))s] $*" | tee -a "$STAGE/summary.txt"; }
pack() { tar -czf "$OUT/device_check.tgz.tmp" -C "$STAGE" . && mv "$OUT/device_check.tgz.tmp" "$OUT/device_check.tgz"; }
# budget CAP: seconds a stage may take, the smaller of CAP and what is left before the deadline.
budget() { local left=$(( DEADLINE_S - ($(date +%s) - start) )); (( left < $1 )) && echo "$left" || echo "$1"; }
status=0
# run_stage NAME CAP CMD...: runs CMD under its budget, logs to $STAGE/NAME.log, records the outcome.
run_stage() {
  local name=$1 cap=$2; shift 2
  case " ${SKIP_STAGES:-} " in *" $name "*) stamp "$name: SKIPPED (SKIP_STAGES)"; return 0;; esac
  local t; t=$(budget "$cap")
  if (( t < 10 )); then stamp "$name: SKIPPED (deadline)"; status=1; return; fi
  stamp "$name: start (budget ${t}s)"
  timeout "$t" "$@" >"$STAGE/$name.log" 2>&1
  local rc=$?
  if (( rc == 0 )); then stamp "$name: ok"
  elif (( rc == 124 )); then stamp "$name: TIMED OUT after ${t}s"; status=1
  else stamp "$name: FAILED rc=$rc"; status=1; fi
  pack
  return $rc
}

{
  echo "sha $FOURM_FAST_GIT_SHA  gpu=$gpu  nproc=$(nproc)"
  $PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  command -v nvcc >/dev/null && nvcc --version | tail -2
  cmake --version 2>/dev/null | head -1
  [ "$gpu" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  command -v compute-sanitizer >/dev/null && echo "compute-sanitizer: $(command -v compute-sanitizer)"
  $PY -c 'import xdist, pytest_timeout; print("pytest-xdist and pytest-timeout present")' 2>&1 | tail -1
  $PY -c 'import nvidia.dali as d; print("dali", d.__version__)' 2>&1 | tail -1
} >"$STAGE/env.txt" 2>&1
cat "$STAGE/env.txt"

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if ! run_stage build 300 env FOURM_FAST_CUDA=1 FOURM_FAST_CUDA_ARCHS=9.0 MAX_JOBS=$(nproc) \
    $PY setup.py build_ext --inplace; then
  tail -60 "$STAGE/build.log"; exit 1
fi
$PY -m fourm_fast info >"$STAGE/info.txt" 2>&1; cat "$STAGE/info.txt"

pytest_args=(-q -p no:cacheprovider tests -m "not slow" --continue-on-collection-errors -rfEs --tb=short --junitxml="$STAGE/tests.xml")
if [ "$gpu" = 1 ]; then
  pytest_args+=(-k cuda)
  if $PY -c 'import xdist, pytest_timeout' 2>/dev/null; then pytest_args+=(-n 8 --timeout 90); fi
fi
run_stage tests 200 $PY -m pytest "${pytest_args[@]}"
tail -25 "$STAGE/tests.log"

if [ "$gpu" = 1 ]; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    run_stage sanitizer 90 compute-sanitizer --tool memcheck --error-exitcode 9 $PY bench/sanitize_cases.py
    tail -4 "$STAGE/sanitizer.log"
    # Shared-memory hazards (cp.async pipelines, barriers) that memcheck does not see: racecheck
    # is slow, so it gets the attention kernels alone (their pipelined tiles are the newest code).
    run_stage racecheck 75 compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 9 \
      $PY bench/sanitize_cases.py --only attention
    tail -4 "$STAGE/racecheck.log"
    run_stage synccheck 60 compute-sanitizer --tool synccheck --error-exitcode 9 $PY bench/sanitize_cases.py
    tail -4 "$STAGE/synccheck.log"
  else
    stamp "sanitizer: SKIPPED (compute-sanitizer not on PATH)"
  fi
  export FOURM_FAST_RESULTS_DIR="$STAGE"
  # Most-wanted first: the open issues' GPU goals (attention, train, generate), then the landed ops.
  run_stage bench_attention 100 $PY bench/bench_attention.py --device cuda --batch 64
  if command -v ncu >/dev/null 2>&1; then  # where the attention kernels lose to SDPA: pipes, occupancy, memory
    run_stage ncu_attention 60 ncu --clock-control none --kernel-name regex:attn_ --launch-skip 3 --launch-count 3 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
      $PY bench/attention_probe.py --pattern encoder --calls 3
  else
    stamp "ncu_attention: SKIPPED (ncu not on PATH)"
  fi
  run_stage bench_train 240 $PY bench/bench_train.py --device cuda --preset B --batch 64 --repeats 10 --compile reduce-overhead --profile
  run_stage train_run 120 $PY bench/train_run_check.py --device cuda --preset B --batch 64 --steps 40
  run_stage bench_generate 60 $PY bench/bench_generate.py --device cuda --quick
  run_stage bench_vq_f32 60 $PY bench/bench_vq.py --device cuda --dtype float32 --max-baseline-gib 24
  run_stage bench_vq_bf16 60 $PY bench/bench_vq.py --device cuda --dtype bfloat16 --max-baseline-gib 24
  run_stage bench_sampling 60 $PY bench/bench_sampling.py --device cuda
  run_stage bench_swiglu 45 $PY bench/bench_swiglu.py --device cuda --compile
  run_stage bench_masking 45 $PY bench/bench_masking.py --device cuda
  if $PY -c 'import nvidia.dali' 2>/dev/null; then
    run_stage bench_data 60 $PY bench/bench_data.py --device cuda --sizes 224 --n 128 --repeats 2
  else
    stamp "bench_data: SKIPPED (nvidia-dali is not installed on this machine)"
  fi
  for f in "$STAGE"/bench_*.log "$STAGE"/train_run.log; do [ -f "$f" ] && { echo "== $f"; tail -15 "$f"; }; done
else
  export FOURM_FAST_RESULTS_DIR="$STAGE"
  run_stage bench_quick 600 bash -c "$PY bench/bench_vq.py --quick --no-save && \
    $PY bench/bench_sampling.py --quick --no-save && $PY bench/bench_masking.py --quick --no-save && \
    $PY bench/bench_train.py --quick --no-save --repeats 2 && $PY bench/train_run_check.py --quick --no-save && \
    $PY bench/bench_generate.py --quick --no-save --no-reference"
fi
stamp "done, status $status"
pack
cat "$STAGE/summary.txt"
exit $status
