#!/usr/bin/env bash
# One-shot check for a lent GPU: build mgcl (with _C_cuda), run the GPU-facing
# tests (their CUDA and Triton cases included), run every GPU bench, write logs
# + JSON under $OUT, and print a short summary last. Uses the machine's python3
# (with torch). Each step has a time limit so the whole fits one device call
# (MGCL_GPU_DEADLINE seconds in all, default 540: a step gets at most its own
# limit and what is left); a step that runs out is reported, not fatal.
#   here:  bash benches/gpu_wheels.sh          (the packages the GPU image lacks)
#   there: OUT=/tmp/gpu bash benches/gpu_check.sh [op ...]   (carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
# What comes back from a device call is at most 8 files: $OUT gets the bench
# JSONs, tests.log and one log.txt; the rest stays in $WORK.
WORK=$(mktemp -d)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
ops=("$@")
[ ${#ops[@]} -eq 0 ] && ops=(fisher_guard contrastive_distill similarity_topk step)
declare -A limit=([fisher_guard]=60 [contrastive_distill]=120 [similarity_topk]=150 [step]=90)
deadline=$((SECONDS + ${MGCL_GPU_DEADLINE:-540}))
budget() {  # budget LIMIT: the seconds a step may take (>= 1)
  local left=$((deadline - SECONDS - 15))
  local b=$(( $1 < left ? $1 : left ))
  echo $(( b > 1 ? b : 1 ))
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$WORK/gpu.txt"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
echo "== build"
MGCL_CUDA=ON timeout "$(budget 240)" $PY -m pip install -q --no-deps --no-build-isolation . > "$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; exit 1; }
(cd /tmp && $PY -m mgcl info) | tee "$WORK/info.txt"

echo "== tests (the ops' files: CUDA, Triton and CPU cases)"
timeout "$(budget 180)" $PY -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/test_fisher_guard.py tests/test_guard.py tests/test_contrastive_distill.py tests/test_similarity_topk.py \
  > "$OUT/tests.log" 2>&1
test_rc=$?
tail -15 "$OUT/tests.log"

echo "== benches"
summary=()
for op in "${ops[@]}"; do
  if (cd /tmp && timeout "$(budget "${limit[$op]:-120}")" $PY -m mgcl bench "$op" --device cuda --json "$OUT/bench_$op.json") \
      > "$WORK/bench_$op.txt" 2>&1; then
    summary+=("$op: ok")
  else
    summary+=("$op: FAILED or timed out, rc=$? (see log.txt)")
  fi
done

echo "== summary"
echo "tests rc=$test_rc"
for op in "${ops[@]}"; do
  echo "--- $op"
  grep -v "it/s\]\|s/it\]" "$WORK/bench_$op.txt" | tail -25
done
printf '%s\n' "${summary[@]}"
for f in gpu.txt info.txt build.log bench_*.txt; do
  [ -f "$WORK/$f" ] && { echo "===== $f"; cat "$WORK/$f"; }
done > "$OUT/log.txt"
exit $test_rc
