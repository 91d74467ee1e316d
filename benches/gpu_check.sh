#!/usr/bin/env bash
# One-shot check for a lent GPU: build mgcl (with _C_cuda), run the test suite
# (the GPU tests included), run every GPU bench, write logs + JSON under $OUT,
# and print a short summary last. Uses the machine's python3 (with torch).
#   OUT=/tmp/gpu bash benches/gpu_check.sh [op ...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
ops=("$@")
[ ${#ops[@]} -eq 0 ] && ops=(fisher_guard contrastive_distill similarity_topk step)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
echo "== build"
MGCL_CUDA=ON $PY -m pip install -q --no-deps --no-build-isolation . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
(cd /tmp && $PY -m mgcl info) | tee "$OUT/info.txt"

echo "== tests (GPU ones included)"
$PY -m pytest -q -x -p no:cacheprovider tests -m "not slow" > "$OUT/tests.log" 2>&1
test_rc=$?
tail -5 "$OUT/tests.log"

echo "== benches"
summary=()
for op in "${ops[@]}"; do
  if (cd /tmp && $PY -m mgcl bench "$op" --device cuda --json "$OUT/bench_$op.json") > "$OUT/bench_$op.txt" 2>&1; then
    summary+=("$op: ok")
  else
    summary+=("$op: FAILED (see bench_$op.txt)")
  fi
done

echo "== summary"
echo "tests rc=$test_rc"
for op in "${ops[@]}"; do
  echo "--- $op"
  cat "$OUT/bench_$op.txt"
done
printf '%s\n' "${summary[@]}"
exit $test_rc
