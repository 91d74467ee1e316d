#!/usr/bin/env bash
# One device run on a lent GPU that proves every kernel, within 10 minutes:
#   1. build mgcl with _C_cuda            -> $OUT/build.log (written there first)
#   2. the -m gpu tests: similarity_topk and fisher_guard first, the Triton
#      files last; one autotune config (MGCL_TRITON_ONE_CONFIG=1)
#                                         -> $OUT/tests.xml (junit), $OUT/tests.log
#   3. compute-sanitizer memcheck and racecheck on one small case per kernel
#      (benches/sanitize_cases.py)        -> $OUT/log.txt
#   4. the benches, --repeats 3, wall and device (CUDA events) time
#                                         -> $OUT/bench_<op>.json, tables in $OUT/log.txt
#   5. a summary table, printed last      -> also at the end of $OUT/log.txt
# That is 8 files in $OUT. Each step runs under `timeout -s INT` (pytest then
# writes its summary and junit XML) with its own limit, cut to what is left
# of MGCL_GPU_DEADLINE (default 570 s); a step that fails or runs out is
# listed in the summary, not fatal. Exit 0 when the run reached its end,
# 1 when it could not run (no GPU, the build failed); never a step's status
# (a timed-out step's 124 would read as the whole command timing out).
#   here:  bash benches/gpu_wheels.sh            (wheels the GPU image lacks)
#   there: OUT=/tmp/gpu bash benches/gpu_check.sh   (carry .whl)
#   CI:    OUT=/tmp/x bash benches/gpu_check.sh --dry-run   (the plan; nothing runs)
# In a dry run each step takes its whole budget on paper, writes its files
# empty, and MGCL_GPU_FAKE_RC_<step>=N makes that step end with status N.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
PY=${PYTHON:-python3}
LOG=$OUT/log.txt
: > "$LOG"
: > "$WORK/status"
export PYTHONUNBUFFERED=1
DEADLINE=${MGCL_GPU_DEADLINE:-570}
RESERVE=10          # seconds kept for the summary
spent=0             # dry run: the seconds the steps would have taken at most
BENCHES=(fisher_guard similarity_topk contrastive_distill step)
# per-step limits in seconds; they add up to DEADLINE - RESERVE
declare -A LIMIT=([build]=140 [tests]=170 [memcheck]=40 [racecheck]=40
                  [bench_fisher_guard]=30 [bench_similarity_topk]=50 [bench_contrastive_distill]=55 [bench_step]=35)

budget() {  # budget STEP: its limit, cut to what is left (>= 1); a dry run counts time on paper only
  local used=$SECONDS lim=${LIMIT[$1]}
  [ "$DRY" = 1 ] && used=$spent
  local left=$((DEADLINE - used - RESERVE))
  local b=$(( lim < left ? lim : left ))
  echo $(( b > 1 ? b : 1 ))
}

# run_step STEP LOGFILE [--makes FILE]... -- CMD...: CMD under its budget, output
# appended to LOGFILE; its status goes to the summary; returns CMD's status.
run_step() {
  local step=$1 log=$2 makes=() b rc status
  shift 2
  while [ "$1" = "--makes" ]; do makes+=("$2"); shift 2; done
  shift  # --
  b=$(budget "$step")
  echo "== $step (budget ${b} s of ${LIMIT[$step]} s): timeout -s INT -k 10 $b $*"
  if [ "$DRY" = 1 ]; then
    echo "[dry run] $*" >> "$log"
    for f in "${makes[@]}"; do : > "$f"; done
    spent=$((spent + b))
    rc_var="MGCL_GPU_FAKE_RC_$step"
    rc=${!rc_var:-0}
  else
    timeout -s INT -k 10 "$b" "$@" >> "$log" 2>&1
    rc=$?
  fi
  case $rc in
    0) status="ok" ;;
    124|137) status="timed out: SIGINT after ${b} s" ;;
    *) status="failed (exit status $rc)" ;;
  esac
  printf '%-29s %s\n' "$step" "$status" >> "$WORK/status"
  return "$rc"
}

summary() {
  $PY benches/gpu_summary.py "$OUT" "$WORK/status" | tee -a "$LOG"
}

# ---- 0. the machine ------------------------------------------------------------------------
if [ "$DRY" = 0 ]; then
  if ! nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv >> "$LOG" 2>&1; then
    echo "gpu_check: could not run: no GPU (nvidia-smi failed)" | tee -a "$LOG"
    exit 1
  fi
  if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >> "$LOG" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

# ---- 1. build ------------------------------------------------------------------------------
if ! run_step build "$OUT/build.log" -- env MGCL_CUDA=ON $PY -m pip install -v --no-deps --no-build-isolation .; then
  tail -40 "$OUT/build.log"
  summary
  echo "gpu_check: could not run: the build failed (see build.log)"
  exit 1
fi
[ "$DRY" = 0 ] && (cd /tmp && $PY -m mgcl info) >> "$LOG" 2>&1

# ---- 2. the GPU tests ------------------------------------------------------------------------
first=(tests/test_similarity_topk.py tests/test_fisher_guard.py)
others=()
for f in $(grep -l "mark.gpu" tests/test_*.py | sort); do
  case " ${first[*]} " in *" $f "*) continue ;; esac
  if grep -q "triton" "$f"; then others+=("$f"); else first+=("$f"); fi
done
per_test=()
$PY -c "import pytest_timeout" 2> /dev/null && per_test=(--timeout=90)
run_step tests "$OUT/tests.log" --makes "$OUT/tests.xml" -- env MGCL_TRITON_ONE_CONFIG=1 \
  $PY -m pytest -m gpu -q -rfE -p no:cacheprovider --junitxml="$OUT/tests.xml" "${per_test[@]}" \
  "${first[@]}" "${others[@]}"
tail -5 "$OUT/tests.log"

# ---- 3. compute-sanitizer ------------------------------------------------------------------
if [ "$DRY" = 1 ] || command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    echo "----- compute-sanitizer --tool $tool" >> "$LOG"
    run_step "$tool" "$LOG" -- compute-sanitizer --tool "$tool" --error-exitcode 3 $PY benches/sanitize_cases.py
  done
else
  printf '%-29s %s\n' "memcheck, racecheck" "not run: compute-sanitizer is not on PATH" >> "$WORK/status"
fi

# ---- 4. benches ------------------------------------------------------------------------------
for op in "${BENCHES[@]}"; do
  echo "----- mgcl bench $op" >> "$LOG"
  run_step "bench_$op" "$LOG" --makes "$OUT/bench_$op.json" -- \
    bash -c "cd /tmp && exec $PY -m mgcl bench $op --device cuda --repeats 3 --json $OUT/bench_$op.json"
done

# ---- 5. summary ------------------------------------------------------------------------------
summary
exit 0
