#!/bin/bash
# `make verify-gpu`: on a GPU host with vLLM installed, start `vllm serve` with a small
# model, run `sluice verify` against it, then `sluice bench --compare --url` (direct vs
# nginx vs sluice, pass-through and with a policy). Everything lands in $OUT.
#
# Environment (all optional):
#   VLLM_URL       an already running backend: skip starting vLLM
#   MODEL_DIR      model to serve (default: a tiny random Llama built by make_tiny_model.py,
#                  which needs torch + transformers; vLLM has both)
#   SERVED_MODEL   --served-model-name (default tiny-llama)
#   VLLM_PORT      default 8100;  VLLM_ARGS  extra `vllm serve` flags
#   BENCH_STREAMS  concurrencies for the bench (default "64 256"; empty: no bench)
#   BENCH_TOKENS   max_tokens per bench stream (default 128)
#   SKIP_VERIFY=1  bench only;  KEEP_VLLM=1  leave the vLLM we started running
#   SLUICE         how to run sluice (default: `sluice`, else python3 -m sluice.control.cli)
#   OUT            output folder (default build/verify-gpu)
# Needs nginx on PATH for the bench (`sluice bench --compare`).
set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-build/verify-gpu}
mkdir -p "$OUT"
LOG="$OUT/verify-gpu.txt"
SERVED=${SERVED_MODEL:-tiny-llama}
PORT=${VLLM_PORT:-8100}
MODEL_DIR=${MODEL_DIR:-/tmp/sluice-tiny-llama}
STREAMS=${BENCH_STREAMS-64 256}
TOKENS=${BENCH_TOKENS:-128}
if [ -z "${SLUICE:-}" ]; then
  if command -v sluice >/dev/null; then SLUICE=sluice; else SLUICE="python3 -m sluice.control.cli"; fi
fi
# vLLM on a machine without network: no hub, no usage stats; the FlashInfer sampler is
# optional and often not installed; NVLink multicast stays off on shared hosts.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
say() { echo "[$(date -u +%T)] $*" | tee -a "$LOG"; }

URL=${VLLM_URL:-}
VLLM_PID=
if [ -z "$URL" ]; then
  if [ ! -d "$MODEL_DIR" ]; then
    say "building the tiny random Llama in $MODEL_DIR"
    python3 "$HERE/make_tiny_model.py" "$MODEL_DIR" >> "$LOG" 2>&1 || { say "model build failed"; exit 2; }
  fi
  say "vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1)"
  # shellcheck disable=SC2086  # VLLM_ARGS is a list of flags
  setsid python3 -m vllm.entrypoints.cli.main serve "$MODEL_DIR" --served-model-name "$SERVED" \
    --enforce-eager --max-model-len 512 --gpu-memory-utilization 0.2 --port "$PORT" ${VLLM_ARGS:-} \
    > "$OUT/vllm.log" 2>&1 < /dev/null &
  VLLM_PID=$!
  [ "${KEEP_VLLM:-0}" = 1 ] || trap 'kill -- -$VLLM_PID 2>/dev/null' EXIT
  URL=http://127.0.0.1:$PORT
  for i in $(seq 600); do
    python3 - "$URL" <<'PY' && break
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1] + "/health", timeout=1).status == 200 else 1)
except Exception:
    sys.exit(1)
PY
    kill -0 "$VLLM_PID" 2>/dev/null || { say "vllm exited:"; tail -40 "$OUT/vllm.log" | tee -a "$LOG"; exit 3; }
    sleep 1
  done
  say "vllm healthy on $URL after ${i} s"
fi

{
  echo "== machine"; uname -srm; nproc; free -g 2>/dev/null | head -2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -V; python3 -c 'import importlib.metadata as m; print("vllm", m.version("vllm"))' 2>/dev/null
  echo "sluice $($SLUICE --help >/dev/null 2>&1 && python3 -c 'import importlib.metadata as m; print(m.version("sluice-gateway"))')"
  echo "nginx: $(nginx -v 2>&1)"
} >> "$LOG" 2>&1

RC=0
if [ "${SKIP_VERIFY:-0}" != 1 ]; then
  say "== sluice verify --backend $URL --model $SERVED"
  $SLUICE verify --backend "$URL" --model "$SERVED" 2>&1 | tee -a "$LOG"
  RC=${PIPESTATUS[0]}
  $SLUICE verify --backend "$URL" --model "$SERVED" --json > "$OUT/verify.json" 2>> "$LOG"
  say "verify exit status $RC (json run: $?)"
fi
for n in $STREAMS; do
  for policy in "" "--policy"; do
    say "== sluice bench --compare --url $URL --concurrency $n --requests $((n * 4)) --max-tokens $TOKENS --rounds 2 $policy"
    # shellcheck disable=SC2086
    timeout 280 $SLUICE bench --compare --url "$URL" --model "$SERVED" --concurrency "$n" \
      --requests $((n * 4)) --max-tokens "$TOKENS" --rounds 2 $policy 2>&1 | tee -a "$LOG"
  done
done
say "done"
exit "$RC"
