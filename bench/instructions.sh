#!/usr/bin/env bash
# User-space instructions per request of `sluice serve`, counted by valgrind's callgrind:
# deterministic to ~0.3% between runs, where CPU time on a shared machine moves by 10% or
# more. What issue 19's per-request work was measured with (docs/BENCHMARKS.md).
#
# usage: bench/instructions.sh BUILD [REQUESTS] [PORT] [serve args...]
#   BUILD     a PYTHONPATH for sluice: build/compiled, or "" for the sources
#   REQUESTS  measured requests (default 2000), after 500 not measured
#   PORT      the simulator's port; sluice takes PORT+1 (default 9150)
#   TOKENS    (environment) tokens per request (default 2)
#   TTFT, ITL (environment) the simulator's first-token and inter-token delays in ms
#             (default 0: it answers at once, so a read holds many events)
# e.g. bench/instructions.sh build/compiled 2000 9150
#      TOKENS=64 bench/instructions.sh build/compiled 300 9160 --config my-policy-dir
#      TOKENS=64 TTFT=20 ITL=10 bench/instructions.sh build/compiled 512   # a read per token
# 64 streams at a time; loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
BUILD=$1; N=${2:-2000}; PORT=${3:-9150}; shift $(( $# < 3 ? $# : 3 ))
TOKENS=${TOKENS:-2}
OUT=$(mktemp -d)
trap 'kill $SIM $SRV 2>/dev/null || true; rm -rf "$OUT"' EXIT
PYTHONPATH=$BUILD .venv/bin/sluice sim --port "$PORT" --ttft-ms "${TTFT:-0}" --itl-ms "${ITL:-0}" >/dev/null 2>&1 &
SIM=$!
PYTHONPATH=$BUILD valgrind --tool=callgrind --instr-atstart=no \
  --callgrind-out-file="$OUT/callgrind.out.%p" \
  .venv/bin/python -m sluice.control.cli serve --backend "http://127.0.0.1:$PORT" \
  --port $((PORT + 1)) "$@" >"$OUT/serve.log" 2>&1 &
SRV=$!
for _ in $(seq 1 120); do
  curl -s -o /dev/null "http://127.0.0.1:$((PORT + 1))/healthz" && break
  sleep 1
done
load() {
  PYTHONPATH=$BUILD .venv/bin/sluice bench --url "http://127.0.0.1:$((PORT + 1))" \
    --concurrency 64 --requests "$1" --max-tokens "$TOKENS" --model sim-model 2>&1 | tail -1
}
load 500 >/dev/null
callgrind_control -i on "$SRV" >/dev/null 2>&1
RESULT=$(load "$N")
callgrind_control -i off "$SRV" >/dev/null 2>&1
callgrind_control -d "$SRV" >/dev/null 2>&1
sleep 1
FILE=$(ls -S "$OUT"/callgrind.out.* | head -1)
TOTAL=$(callgrind_annotate "$FILE" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')
echo "instructions per request: $((TOTAL / N)) ($N requests x $TOKENS tokens; load: $RESULT)"
