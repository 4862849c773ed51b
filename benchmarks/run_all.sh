#!/usr/bin/env bash
# Run every benchmark one after another on a quiet machine; each prints a table and a JSON
# line, saved under benchmarks/results/ (NAME.txt: the whole output, NAME.json: the JSON).
#   bash benchmarks/run_all.sh [train store explorer analyze steer quality]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p benchmarks/results
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(train store explorer analyze steer)
for name in "${names[@]}"; do
  echo "== $name"
  "$PY" "benchmarks/bench_$name.py" 2>&1 | tr '\r' '\n' | tee "benchmarks/results/$name.txt"
  if [ "$name" != train ] && [ "$name" != quality ]; then  # those two write their own JSON
    grep '^{' "benchmarks/results/$name.txt" | tail -n 1 > "benchmarks/results/$name.json"
  fi
done
