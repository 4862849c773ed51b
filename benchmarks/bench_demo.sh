#!/usr/bin/env bash
# Time `moesae demo` from an empty data folder to a served explorer (/_stcore/health answers),
# then once more with everything cached. Uses its own data folder (default /tmp/moesae-demo-time,
# deleted first), so nothing under data/ is touched.
#   bash benchmarks/bench_demo.sh [DATA_DIR]
set -u
cd "$(dirname "$0")/.."
export MOESAE_DATA=${1:-/tmp/moesae-demo-time}
PORT=${PORT:-8600}
rm -rf "$MOESAE_DATA"
for run in first second; do
  start=$(date +%s.%N)
  setsid .venv/bin/moesae demo --port "$PORT" > "$MOESAE_DATA.$run.log" 2>&1 &
  pid=$!
  until curl -sf "http://127.0.0.1:$PORT/_stcore/health" >/dev/null; do
    sleep 0.5
    kill -0 $pid 2>/dev/null || { echo "$run: the demo exited"; tail -5 "$MOESAE_DATA.$run.log"; exit 1; }
  done
  end=$(date +%s.%N)
  echo "$run run: $(echo "$end - $start" | bc) s to a served explorer"
  kill -TERM -- -$pid; wait $pid 2>/dev/null; sleep 2
done
