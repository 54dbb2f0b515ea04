#!/usr/bin/env bash
# One command: install what is missing, start a private redis-server, submit examples/prompts.parquet
# to a local-directory store (./.prefixq), run a CPU worker in burst mode, show progress, print the results.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$ROOT/infra/local/setup.sh"
cd "$ROOT"

STATE="$ROOT/.prefixq"
mkdir -p "$STATE"
PORT="$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
  --logfile "$STATE/redis.log" &
REDIS_PID=$!
WORKER_PID=""
cleanup() {
  [ -n "$WORKER_PID" ] && kill "$WORKER_PID" 2>/dev/null || true
  kill "$REDIS_PID" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

export PREFIXQ_REDIS_URL="redis://127.0.0.1:$PORT/0"
export PREFIXQ_STORE="file://$STATE/store"
ENGINE="${PREFIXQ_ENGINE:-paged}"

echo "== preparing the model (first run converts SmolLM2 from GGUF, once)"
python -c 'from engine.model_source import resolve_model; print(resolve_model("smollm2"))'

echo "== submitting examples/prompts.parquet"
JOB="$(prefixq submit examples/prompts.parquet --max-tokens 48 --temperature 0)"
echo "job id: $JOB"

echo "== starting a worker (engine $ENGINE, burst mode; log in .prefixq/worker.log)"
prefixq worker --engine "$ENGINE" --burst --metrics-port 0 >"$STATE/worker.log" 2>&1 &
WORKER_PID=$!

prefixq status "$JOB" --watch >/dev/null || true
wait "$WORKER_PID" || { echo "worker failed; see .prefixq/worker.log" >&2; tail -20 "$STATE/worker.log" >&2; exit 1; }
WORKER_PID=""
prefixq status "$JOB"
echo "== results"
prefixq results "$JOB" -o "$STATE/results.parquet" --print
