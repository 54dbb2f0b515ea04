#!/usr/bin/env bash
# Submit a prefixq job and follow it to its results using redis-cli only: the plain-Redis
# contract v1 (docs/redis-contract.md). Any language can do the same with its Redis client.
#
#   REDIS_URL=redis://:password@host:6379/0 infra/examples/redis-cli-submit.sh [CLIENT_ID] [REQUEST_ID]
#
# Env: INPUT_URL (a job file already in the store, e.g. s3://bucket/in/prompts.jsonl; default:
# three inline rows), MAX_TOKENS (default 8), TIMEOUT seconds (default 300).
# Prints the job id, progress lines, and the final status hash; exits 0 when the job succeeded.
set -euo pipefail

REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
CLIENT_ID=${1:-example-client}
REQUEST_ID=${2:-req-$(date +%s)-$$}
MAX_TOKENS=${MAX_TOKENS:-8}
TIMEOUT=${TIMEOUT:-300}

rcli() { redis-cli --no-auth-warning -u "$REDIS_URL" "$@"; }

if [[ -n "${INPUT_URL:-}" ]]; then
  INPUT="{\"url\": \"$INPUT_URL\"}"
else
  INPUT='{"rows": [
    {"custom_id": "q1", "prompt": "The capital of France is"},
    {"custom_id": "q2", "prompt": "The capital of Spain is"},
    {"custom_id": "q3", "messages": [{"role": "user", "content": "Name a color."}]}]}'
fi
SPEC="{\"version\": 1, \"client_id\": \"$CLIENT_ID\", \"request_id\": \"$REQUEST_ID\",
       \"input\": $INPUT, \"options\": {\"max_tokens\": $MAX_TOKENS, \"temperature\": 0}}"

entry=$(rcli XADD prefixq:v1:submit '*' spec "$SPEC")
echo "submitted entry $entry as $CLIENT_ID/$REQUEST_ID"

deadline=$(( $(date +%s) + TIMEOUT ))
job=""
while [[ -z "$job" ]]; do
  job=$(rcli HGET "prefixq:v1:requests:$CLIENT_ID" "$REQUEST_ID")
  if [[ -z "$job" ]]; then
    # a rejected request gets a reply but no mapping: show the error and stop
    err=$(rcli XREVRANGE "prefixq:v1:replies:$CLIENT_ID" + - COUNT 20 \
          | awk -v id="$REQUEST_ID" 'prev=="request_id" && $0==id {hit=1} hit && prev=="error" {print; exit} {prev=$0}')
    if [[ -n "$err" ]]; then echo "rejected: $err" >&2; exit 2; fi
    if (( $(date +%s) > deadline )); then echo "no worker took the request in ${TIMEOUT}s" >&2; exit 3; fi
    sleep 0.5
  fi
done
echo "job $job"

status=""
while true; do
  status=$(rcli HGET "prefixq:v1:status:$job" status)
  echo "status=$status done=$(rcli HGET "prefixq:v1:status:$job" done)/$(rcli HGET "prefixq:v1:status:$job" total)"
  case "$status" in succeeded|failed|cancelled|dead) break ;; esac
  if (( $(date +%s) > deadline )); then echo "job $job still $status after ${TIMEOUT}s" >&2; exit 3; fi
  sleep 1
done
rcli HGETALL "prefixq:v1:status:$job"
[[ "$status" == succeeded ]]
