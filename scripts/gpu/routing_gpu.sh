#!/bin/bash
# `make bench-routing-gpu`: two real vLLM replicas with prefix caching on one GPU, then
# `sluice bench routing --urls` against them (round-robin via nginx, least-outstanding,
# sluice's default scorer). Everything lands in $OUT.
#
# The model is a random-weight Llama built by make_tiny_model.py, by default ~1.1B
# parameters (hidden 2048, 24 layers): the 2-layer tiny model's prefill is too cheap for a
# prefix cache to matter. Its tokenizer makes ~1.6 characters a token, so the default
# 4,000-character system prompts are ~2,500 tokens. Each replica's KV cache is capped at
# NUM_BLOCKS blocks of 16 tokens (default 4000: ~64k tokens, ~25 of the 40 tenants'
# prompts), so one replica cannot hold every tenant and round-robin is not handed the
# whole cache.
#
# Environment (all optional):
#   MODEL_DIR    model to serve (default /tmp/sluice-routing-llama, built if absent;
#                TINY_* knobs of make_tiny_model.py pick its size)
#   SERVED_MODEL --served-model-name (default routing-llama)
#   PORTS        two or more ports (default "8101 8102"); GPU_UTIL (default 0.35 each)
#   NUM_BLOCKS   --num-gpu-blocks-override per replica (default 4000; empty: vLLM's own)
#   MAX_LEN      --max-model-len (default 8192);  VLLM_ARGS  extra `vllm serve` flags
#   BENCH_ARGS   extra flags for `sluice bench routing` (default: 40 tenants, 4000 chars,
#                64 concurrent, 1200 requests, 16 tokens)
#   ROUNDS       shared-workload rounds (default 2); the unique workload runs once
#   SLUICE       how to run sluice (default `sluice`, else python3 -m sluice.control.cli)
#   OUT          output folder (default build/routing-gpu)
# Needs nginx on PATH. VLLM_SERVER_DEV_MODE=1 is set so the bench can
# POST /reset_prefix_cache before each run.
set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-build/routing-gpu}
mkdir -p "$OUT"
LOG="$OUT/routing-gpu.txt"
SERVED=${SERVED_MODEL:-routing-llama}
PORTS=${PORTS:-8101 8102}
MODEL_DIR=${MODEL_DIR:-/tmp/sluice-routing-llama}
NUM_BLOCKS=${NUM_BLOCKS-4000}
MAX_LEN=${MAX_LEN:-8192}
ROUNDS=${ROUNDS:-2}
BENCH_ARGS=${BENCH_ARGS:---tenants 40 --system-chars 4000 --concurrency 64 --requests 1200 --max-tokens 16 --timeout 120}
if [ -z "${SLUICE:-}" ]; then
  if command -v sluice >/dev/null; then SLUICE=sluice; else SLUICE="python3 -m sluice.control.cli"; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0} VLLM_SERVER_DEV_MODE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
say() { echo "[$(date -u +%T)] $*" | tee -a "$LOG"; }

if [ ! -f "$MODEL_DIR/config.json" ]; then
  say "building the random Llama in $MODEL_DIR"
  TINY_HIDDEN=${TINY_HIDDEN:-2048} TINY_LAYERS=${TINY_LAYERS:-24} TINY_HEADS=${TINY_HEADS:-16} \
  TINY_KV_HEADS=${TINY_KV_HEADS:-8} TINY_INTERMEDIATE=${TINY_INTERMEDIATE:-5632} \
  TINY_MAX_POS=${TINY_MAX_POS:-$MAX_LEN} TINY_INIT_RANGE=${TINY_INIT_RANGE:-0.02} \
  TINY_DEVICE=${TINY_DEVICE:-cuda} python3 "$HERE/make_tiny_model.py" "$MODEL_DIR" >> "$LOG" 2>&1 \
    || { say "model build failed"; tail -20 "$LOG"; exit 2; }
fi

healthy() {
  python3 - "$1" <<'PY'
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1] + "/health", timeout=1).status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

PIDS=()
URLS=()
BLOCKS_FLAG=()
[ -n "$NUM_BLOCKS" ] && BLOCKS_FLAG=(--num-gpu-blocks-override "$NUM_BLOCKS")
say "vllm $(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>&1)"
for port in $PORTS; do
  ARGS=(serve "$MODEL_DIR" --served-model-name "$SERVED" --port "$port" --enforce-eager
        --enable-prefix-caching --max-model-len "$MAX_LEN" --gpu-memory-utilization "${GPU_UTIL:-0.35}"
        "${BLOCKS_FLAG[@]}")
  say "starting: vllm ${ARGS[*]} ${VLLM_ARGS:-}"
  # shellcheck disable=SC2086  # VLLM_ARGS is a list of flags
  setsid python3 -m vllm.entrypoints.cli.main "${ARGS[@]}" ${VLLM_ARGS:-} \
    > "$OUT/vllm-$port.log" 2>&1 < /dev/null &
  PIDS+=($!)
  URLS+=("http://127.0.0.1:$port")
done
[ "${KEEP_VLLM:-0}" = 1 ] || trap 'for p in "${PIDS[@]}"; do kill -- -$p 2>/dev/null; done' EXIT
for i in "${!URLS[@]}"; do
  for s in $(seq 600); do
    healthy "${URLS[$i]}" && break
    kill -0 "${PIDS[$i]}" 2>/dev/null || { say "vllm ${URLS[$i]} exited:"; tail -40 "$OUT/vllm-${URLS[$i]##*:}.log" | tee -a "$LOG"; exit 3; }
    sleep 1
  done
  say "vllm healthy on ${URLS[$i]} (${SECONDS} s since the script started)"
done
JOINED=$(IFS=,; echo "${URLS[*]}")

{
  echo "== machine"; uname -srm; nproc; free -g 2>/dev/null | head -2
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>/dev/null
  python3 -V; python3 -c 'import importlib.metadata as m; print("vllm", m.version("vllm"))' 2>/dev/null
  python3 -c 'import importlib.metadata as m; print("sluice", m.version("sluice-gateway"))' 2>/dev/null
  echo "nginx: $(nginx -v 2>&1)"
  echo "== model config"; cat "$MODEL_DIR/config.json"
  echo "== KV cache lines"; grep -h -i "kv cache\|num_gpu_blocks\|GPU blocks\|prefix cach" "$OUT"/vllm-*.log | head -20
} >> "$LOG" 2>&1

# Warm-up: a few requests to each replica, so the first run does not pay first-request costs.
python3 - "$SERVED" "${URLS[@]}" <<'PY' >> "$LOG" 2>&1
import json, sys, urllib.request
model, urls = sys.argv[1], sys.argv[2:]
for url in urls:
    for i in range(4):
        body = {"model": model, "max_tokens": 8, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"warm up {i} " + "hello " * 300}]}
        req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        usage = json.load(urllib.request.urlopen(req, timeout=60))["usage"]
    print("warm-up", url, usage)
PY

bench() {  # bench NAME WORKLOAD
  say "== sluice bench routing --urls $JOINED --model $SERVED --workload $2 $BENCH_ARGS"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  $SLUICE bench routing --urls "$JOINED" --model "$SERVED" --workload "$2" $BENCH_ARGS --json \
    > "$OUT/$1.json" 2>> "$LOG"
  local rc=$?
  python3 -c 'import json,sys; from sluice.control.bench.routing import format_report; print(format_report(json.load(open(sys.argv[1]))))' \
    "$OUT/$1.json" 2>&1 | tee -a "$LOG"
  say "bench $1 exit $rc"
}
# shared, unique, then the further shared rounds: a cut-short run still has both workloads.
bench shared-1 shared
bench unique-1 unique
for r in $(seq 2 "$ROUNDS"); do bench "shared-$r" shared; done

{
  echo "== replicas' /metrics at the end (prefix cache, requests, tokens)"
  for url in "${URLS[@]}"; do
    echo "-- $url"
    python3 -c 'import sys,urllib.request; print(urllib.request.urlopen(sys.argv[1]+"/metrics").read().decode())' "$url" \
      | grep -E "^vllm:(prefix_cache|prompt_tokens_total|generation_tokens_total|request_success_total|kv_cache_usage|num_requests)"
  done
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
} >> "$LOG" 2>&1
say "done"
