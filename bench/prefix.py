"""Prefix caching and prefix grouping on shared-prefix workloads (`prefixq bench prefix`).

Three workloads, each shuffled into a random arrival order (fixed seed), 64 output tokens per
request (ignore_eos, no detokenization):

  a  1,000 requests sharing one 1,024-token system prompt, user parts of 64-256 tokens
  b  32 few-shot templates of 1,500 tokens x 64 questions each (questions 30-100 tokens)
  c  RAG: 200 documents of 2,000 tokens, each asked 5 different questions (30-100 tokens)

Each workload runs in these modes, on one engine whose KV pool is fixed to hold only a small
fraction of all prompt tokens (`--cache-fraction`), so that the order decides the hit rate:

  off        prefix caching off, arrival order
  arrival    caching on, arrival order
  grouped    caching on, rows ordered by `worker.prefix_order.order_by_prefix` (radix-tree DFS)
  grouped_nocascade  as grouped, with shared-prefix (cascade) decode attention off, to show
             what cascade attention adds (on the GPU; the CPU never uses it by default)

Requests are fed the way the worker feeds them: at most `--max-inflight` (default 2 x max_num_seqs)
in the engine, more added as they finish (`--feed bounded`, the default and the one the headline
figures use). `--feed all` adds every request up front instead; `--feed both` runs the cached modes
both ways (modes `arrival_all`, `grouped_all`). Two requests that share a prefix and arrive in the
same step do not both compute it: the scheduler admits the second one a step later, as a hit.
`--gate` adds the older feeder-side hold-back (a row waits until the row before it is cached),
which serializes admissions of a group and is kept only for comparison.

    python -m bench.prefix --dummy-weights qwen3-0.6b                  # GPU, full size
    python -m bench.prefix --model smollm2                             # GPU, real SmolLM2 weights
    python -m bench.prefix --dummy-weights smollm2-135m --device cpu --scale 0.05 --len-scale 0.25

Per mode it reports prefill tokens computed, the hit rate (cached prompt tokens / prompt tokens),
that hit rate as a fraction of the best possible (`prefix_stats`: every full block whose prefix
appeared before is a hit, unbounded cache), output tok/s and time to finish, and the speedups of
grouping against caching off and against arrival order. Results go to
bench/results/prefix-<model>-<gpu|cpu>.json (or $OUT/), in bench.common.write_result's format.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import random
import time
from dataclasses import dataclass

import torch

from bench.common import device_name, print_table, write_result

OUTPUT_LEN = 64
WORKLOADS = {
    "a": "1,000 requests, one shared 1,024-token system prompt, user parts 64-256 tokens",
    "b": "32 few-shot templates of 1,500 tokens x 64 questions (30-100 tokens)",
    "c": "RAG: 200 documents of 2,000 tokens x 5 questions (30-100 tokens)",
}
MODES_BOUNDED = ["off", "arrival", "grouped", "grouped_nocascade"]
MODES_ALL = ["arrival_all", "grouped_all"]


# ---- workloads ---------------------------------------------------------------------------------
def _toks(n: int, rng: random.Random, vocab: int) -> list[int]:
    # Avoid the low ids, where special tokens usually live.
    return [rng.randrange(min(1000, vocab // 2), vocab) for _ in range(n)]


def make_workload(name: str, scale: float, len_scale: float, vocab: int, seed: int,
                  questions_per_template: int = 64) -> list[list[int]]:
    """Prompts of one workload, already shuffled into arrival order."""
    rng = random.Random(f"{seed}-{name}")
    L = lambda n: max(1, round(n * len_scale))  # noqa: E731
    if name == "a":
        system = _toks(L(1024), rng, vocab)
        n = max(2, round(1000 * scale))
        prompts = [system + _toks(rng.randint(L(64), L(256)), rng, vocab) for _ in range(n)]
    elif name == "b":
        prompts = []
        for _ in range(max(2, round(32 * scale))):
            template = _toks(L(1500), rng, vocab)
            prompts += [template + _toks(rng.randint(L(30), L(100)), rng, vocab) for _ in range(questions_per_template)]
    elif name == "c":
        prompts = []
        for _ in range(max(2, round(200 * scale))):
            doc = _toks(L(2000), rng, vocab)
            prompts += [doc + _toks(rng.randint(L(30), L(100)), rng, vocab) for _ in range(5)]
    else:
        raise ValueError(f"unknown workload {name!r} (a, b or c)")
    rng.shuffle(prompts)
    return prompts


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    lo = 0
    while lo < n and a[lo:lo + 256] == b[lo:lo + 256]:  # slice compares run in C
        lo = min(n, lo + 256)
    while lo < n and a[lo] == b[lo]:
        lo += 1
    return lo


# ---- sizing ------------------------------------------------------------------------------------
def pool_blocks(prompts: list[list[int]], fraction: float, floor_seqs: int, block_size: int,
                output_len: int = OUTPUT_LEN) -> tuple[int, int]:
    """KV pool size: fraction x all prompt tokens, but never less than `floor_seqs` of the longest
    requests need without any sharing. The default floor is one request: how many run at once is
    then decided by the pool, as for a user whose cache is small, and sharing lets more of them
    fit (caching off fills the pool with copies of the same prefix). Returns (blocks, floor)."""
    total = sum(map(len, prompts))
    want = math.ceil(fraction * total / block_size)
    longest = max(map(len, prompts)) + output_len
    floor = floor_seqs * math.ceil(longest / block_size)
    return max(want, floor), floor


# ---- one run -----------------------------------------------------------------------------------
@dataclass
class Counts:
    """Exact per-admission counters, taken from what the scheduler actually admitted."""
    admissions: int = 0
    readmissions: int = 0  # admissions after a preemption
    admit_query_tokens: int = 0
    admit_hit_tokens: int = 0
    computed_tokens: int = 0  # every token the model ran forward
    prefill_tokens: int = 0  # of those, prompt tokens and tokens recomputed after a preemption


def _instrument(sched, counts: Counts):
    orig = sched.schedule
    upto: dict[int, int] = {}  # per request: positions below this are prefill (prompt, or recompute)

    def schedule(*args, **kwargs):
        waiting = {id(r) for r in sched.waiting}
        preempted = {id(r) for r in sched.waiting if r.num_preemptions}
        out = orig(*args, **kwargs)
        # Runs before the engine launches the batch, so num_computed_tokens is where each grant starts.
        for req, n in zip(out.requests, out.num_tokens):
            counts.computed_tokens += n
            if id(req) in waiting:
                counts.admissions += 1
                counts.readmissions += id(req) in preempted
                counts.admit_query_tokens += req.num_tokens
                counts.admit_hit_tokens += req.num_hit_tokens
                # prompt, plus the outputs to recompute after a preemption (the last one is fed as decode)
                upto[id(req)] = req.num_tokens - (1 if req.output_token_ids else 0)
            start = req.num_computed_tokens
            counts.prefill_tokens += max(0, min(start + n, upto.get(id(req), req.num_prompt_tokens)) - start)
        return out

    sched.schedule = schedule


def fresh_state(eng, num_blocks: int, caching: bool) -> None:
    """A new, empty prefix cache and scheduler over the first num_blocks blocks of the pool."""
    from engine.block_manager import BlockManager
    from engine.scheduler import Scheduler
    if num_blocks > eng.runner.num_blocks:
        raise ValueError(f"pool has {eng.runner.num_blocks} blocks, {num_blocks} asked")
    eng.config.enable_prefix_caching = caching
    eng.block_manager = BlockManager(num_blocks, eng.config.block_size, caching,
                                     model_key=eng.block_manager.model_key)
    old = eng.scheduler
    eng.scheduler = Scheduler(eng.config, eng.block_manager, eng.max_model_len)
    # Keep the engine's admission policy (admission gathering on the GPU).
    eng.scheduler.min_admission_slots = old.min_admission_slots
    eng.scheduler.max_admission_wait = old.max_admission_wait
    for k in eng.counters:
        eng.counters[k] = 0
    for k in eng.timings:
        eng.timings[k] = 0 if k == "steps" else 0.0


def run_mode(eng, prompts: list[list[int]], order: list[int], *, caching: bool, num_blocks: int,
             max_inflight: int | None, gate: bool, output_len: int = OUTPUT_LEN, cascade: bool = True) -> dict:
    """Feed prompts[order] to a fresh cache; max_inflight None adds everything up front.
    cascade=False turns shared-prefix decode attention off for this run."""
    from engine.sampling_params import SamplingParams
    fresh_state(eng, num_blocks, caching)
    runner = eng.runner
    cascade_rows = runner.cascade_min_rows
    if not cascade:
        runner.cascade_min_rows = None
    cascade_steps0 = runner.cascade_steps
    eng.step_log = []
    counts = Counts()
    _instrument(eng.scheduler, counts)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    bs = eng.config.block_size
    seq = [prompts[i] for i in order]
    # Full blocks each row shares with the row fed before it.
    shared = [0] + [common_prefix_len(seq[k - 1], seq[k]) // bs * bs for k in range(1, len(seq))]
    gated = 0
    outs = []
    nxt = 0
    cap = len(seq) if max_inflight is None else max_inflight
    gate = gate and caching and max_inflight is not None  # feeding everything up front holds nothing back
    inflight = 0
    if eng.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.monotonic()
    while nxt < len(seq) or eng.has_unfinished():
        while nxt < len(seq) and inflight < cap:
            if gate and shared[nxt] >= bs:
                prev = eng.requests.get(str(nxt - 1))
                if prev is not None and prev.num_cached_blocks * bs < shared[nxt]:
                    gated += 1
                    break  # the previous row's shared prefix is not in the prefix cache yet
            eng.add_request(str(nxt), seq[nxt], params)
            nxt += 1
            inflight += 1
        for o in eng.step():
            outs.append(o)
            inflight -= 1
    elapsed = time.monotonic() - t0
    runner.cascade_min_rows = cascade_rows
    log, eng.step_log = eng.step_log, None
    bad = [o for o in outs if o.finish_reason != "length" or len(o.token_ids) != output_len]
    if len(outs) != len(seq) or bad:
        raise RuntimeError(f"{len(bad)} of {len(outs)}/{len(seq)} requests failed: "
                           f"{bad[0].finish_reason if bad else ''} {bad[0].error if bad else ''}")
    st = eng.stats()
    ptoks = sum(map(len, seq))
    gen = sum(len(o.token_ids) for o in outs)
    assert st["prompt_tokens"] == ptoks, (st["prompt_tokens"], ptoks)
    prefill_computed = counts.prefill_tokens
    bm = eng.block_manager.stats
    return {
        "prompt_tokens": ptoks, "cached_tokens": st["cached_tokens"],
        "prefill_tokens_computed": prefill_computed,
        "prompt_minus_cached_tokens": ptoks - st["cached_tokens"],
        "recomputed_tokens": prefill_computed - (ptoks - st["cached_tokens"]),
        "hit_rate": st["cached_tokens"] / ptoks,
        "output_tokens": gen, "output_tok_s": gen / elapsed, "elapsed_s": elapsed,
        "computed_tokens": counts.computed_tokens, "steps": eng.timings["steps"], "preemptions": eng.scheduler.num_preemptions,
        "admissions": counts.admissions, "readmissions": counts.readmissions,
        "admit_hit_tokens": counts.admit_hit_tokens, "admit_query_tokens": counts.admit_query_tokens,
        "bm_queries": bm.queries, "bm_query_tokens": bm.query_tokens, "bm_hit_tokens": bm.hit_tokens,
        "gated_waits": gated,
        # Where the time went: steps with only decode rows against steps that also prefill.
        "decode_steps": sum(1 for e in log if e[1]), "decode_step_s": sum(e[0] for e in log if e[1]),
        "prefill_step_s": sum(e[0] for e in log if not e[1]),
        "cascade_steps": runner.cascade_steps - cascade_steps0,
    }


# ---- driver ------------------------------------------------------------------------------------
def model_path(args) -> str:
    if args.dummy_weights:
        import os
        if os.path.isdir(args.dummy_weights):  # a folder holding a config.json (tests)
            return args.dummy_weights
        from engine.models.shapes import dummy_model_dir
        return dummy_model_dir(args.dummy_weights)
    from engine.model_source import resolve_model
    return resolve_model(args.model)


def build_engine(args, path: str, num_blocks: int, max_model_len: int):
    from engine.llm_engine import LLMEngine
    kw = dict(device=args.device, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=max_model_len, num_gpu_blocks_override=num_blocks, enable_prefix_caching=True,
              seed=args.seed, num_scheduler_steps=args.num_scheduler_steps)
    if args.dummy_weights:
        kw["load_format"] = "dummy"
    if args.cascade == "on":
        kw["cascade_attention"] = True
    eng = LLMEngine(path, **kw)
    if args.cascade == "on":
        from engine.model_runner import CASCADE_MIN_ROWS
        eng.runner.cascade_min_rows = CASCADE_MIN_ROWS  # the GPU default's row threshold, not the tests' 2
    return eng


def warm_up(eng, prompts: list[list[int]]) -> None:
    """Compile kernels for this workload's prefill and decode shapes outside the timings (run on a
    throwaway cache: every mode starts from a fresh one)."""
    from engine.sampling_params import SamplingParams
    p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    for i, pr in enumerate(prompts):
        eng.add_request(f"warm{i}", pr, p)
    while eng.has_unfinished():
        eng.step()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="prefixq bench prefix", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dummy-weights", default=None,
                    help="random weights in a named shape (qwen3-0.6b, smollm2-135m, ...) or a folder with a config.json")
    ap.add_argument("--workloads", default="a,b,c")
    ap.add_argument("--scale", type=float, default=1.0, help="scales the number of requests/templates/documents")
    ap.add_argument("--questions-per-template", type=int, default=64, help="workload b (64; less for quick CPU runs)")
    ap.add_argument("--len-scale", type=float, default=1.0, help="scales every prompt length (CPU runs)")
    ap.add_argument("--output-len", type=int, default=OUTPUT_LEN, help="output tokens per request (64; less for quick CPU runs)")
    ap.add_argument("--cache-fraction", type=float, default=0.08,
                    help="KV pool as a fraction of all prompt tokens (raised to what --floor-seqs unshared requests need)")
    ap.add_argument("--floor-seqs", type=int, default=1,
                    help="the pool holds at least this many of the longest requests without sharing")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="the engine's GPU default")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-inflight", type=int, default=None, help="rows in the engine at once (default 2 x max_num_seqs)")
    ap.add_argument("--feed", choices=["bounded", "all", "both"], default="bounded")
    ap.add_argument("--gate", action="store_true", help="also hold a row back in the feeder until its predecessor's shared prefix is cached")
    ap.add_argument("--modes", default=None, help="comma list of modes to run (default: all for --feed)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every mode this many times (interleaved) and report the median run")
    ap.add_argument("--cascade", choices=["auto", "on"], default="auto",
                    help="shared-prefix decode attention: the engine's default, or on whatever the model's KV width")
    ap.add_argument("--num-scheduler-steps", type=int, default=1,
                    help="decode steps per host step where a step only decodes (every mode alike)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="result file name (bench/results/<name>.json)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    max_inflight = args.max_inflight or 2 * args.max_num_seqs
    modes = ([] if args.feed == "all" else MODES_BOUNDED) + ([] if args.feed == "bounded" else MODES_ALL)
    if args.feed == "all":
        modes = ["off"] + modes
    if args.modes:
        modes = [m for m in args.modes.split(",") if m]

    from worker.prefix_order import order_by_prefix, prefix_stats
    path = model_path(args)
    with open(f"{path}/config.json") as f:
        vocab = json.load(f)["vocab_size"]
    names = [w for w in args.workloads.split(",") if w]
    loads = {w: make_workload(w, args.scale, args.len_scale, min(vocab, 49152), args.seed, args.questions_per_template)
             for w in names}
    bs = 16
    sizing = {w: pool_blocks(p, args.cache_fraction, args.floor_seqs, bs, args.output_len) for w, p in loads.items()}
    max_len = max(max(map(len, p)) for p in loads.values()) + args.output_len + 16
    eng = build_engine(args, path, max(b for b, _ in sizing.values()), max_len)
    bs = eng.config.block_size
    assert bs == 16, "pool sizing assumed 16-token blocks"
    dev = device_name(args.device)
    if eng.runner.cascade_min_rows is None and "grouped_nocascade" in modes and not args.modes:
        # Cascade is off for this model by default (its KV rows are too narrow, or no GPU), so
        # "grouped" already runs without it: the extra mode would only time the same thing twice.
        modes = [m for m in modes if m != "grouped_nocascade"]
        print("cascade attention is off by default for this model: skipping grouped_nocascade")

    figures: dict = {}
    baseline: dict = {}
    details: dict = {}
    table: list[tuple[str, dict]] = []
    for w, prompts in loads.items():
        blocks, floor = sizing[w]
        ptoks = sum(map(len, prompts))
        best = prefix_stats(prompts, bs)
        t = time.monotonic()
        grouped = order_by_prefix(prompts, key=lambda p: p)
        order_s = time.monotonic() - t
        arrival = list(range(len(prompts)))
        fresh_state(eng, blocks, True)
        warm_up(eng, prompts[:args.max_num_seqs])
        info = {"requests": len(prompts), "prompt_tokens": ptoks, "kv_blocks": blocks,
                "kv_blocks_running_floor": floor, "cache_fraction_actual": blocks * bs / ptoks,
                "best_hit_rate": best.best_hit_rate, "best_cached_tokens": best.best_cached_tokens,
                "order_seconds": order_s}
        print(f"workload {w}: {WORKLOADS[w]} (scale {args.scale}, len-scale {args.len_scale}): "
              f"{len(prompts)} requests, {ptoks:,} prompt tokens, pool {blocks} blocks = "
              f"{info['cache_fraction_actual']:.1%} of prompt tokens, best hit rate {best.best_hit_rate:.3f}", flush=True)
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for rep in range(args.repeats):  # modes interleaved, so a slow spell hits all of them
            for m in modes:
                caching = m != "off"
                order = grouped if m.startswith("grouped") else arrival
                r = run_mode(eng, prompts, order, caching=caching, num_blocks=blocks,
                             max_inflight=None if m.endswith("_all") else max_inflight, gate=args.gate,
                             output_len=args.output_len, cascade=not m.endswith("_nocascade"))
                r["hit_rate_of_best"] = r["hit_rate"] / best.best_hit_rate if best.best_hit_rate else 0.0
                runs[m].append(r)
                print(f"  {m:12s} run {rep + 1}/{args.repeats}: {r['elapsed_s']:.2f}s", flush=True)
                gc.collect()
        res = {}
        for m in modes:
            # The run with the median time (the lower middle one for an even count) stands for the mode.
            ranked = sorted(runs[m], key=lambda x: x["elapsed_s"])
            r = dict(ranked[(len(ranked) - 1) // 2])
            r["elapsed_runs_s"] = [x["elapsed_s"] for x in runs[m]]
            res[m] = r
            table.append((f"{w} {m}", r))
            print(f"  {m:12s} prefill computed {r['prefill_tokens_computed']:>10,}  hit {r['hit_rate']:.3f} "
                  f"({r['hit_rate_of_best']:.1%} of best)  {r['output_tok_s']:,.1f} out tok/s  "
                  f"{r['elapsed_s']:.2f}s  preempt {r['preemptions']}  decode-only steps {r['decode_steps']} "
                  f"{r['decode_step_s']:.2f}s, other steps {r['prefill_step_s']:.2f}s, cascade {r['cascade_steps']}",
                  flush=True)
        details[w] = {"workload": info, "modes": res}
        for k, v in info.items():
            figures[f"{w}_{k}"] = v
        for m, r in res.items():
            # The comparison run is caching off, or arrival order where off was not run.
            dst = baseline if m == ("off" if "off" in res else "arrival") else figures
            for k in ("prefill_tokens_computed", "hit_rate", "hit_rate_of_best", "output_tok_s", "elapsed_s",
                      "preemptions", "recomputed_tokens", "decode_step_s", "prefill_step_s", "cascade_steps"):
                dst[f"{w}_{m}_{k}"] = r[k]
        if "grouped" in res:
            g = res["grouped"]
            if "off" in res:
                figures[f"{w}_speedup_grouped_vs_off"] = res["off"]["elapsed_s"] / g["elapsed_s"]
                figures[f"{w}_prefill_reduction_grouped_vs_off"] = (
                    res["off"]["prefill_tokens_computed"] / max(1, g["prefill_tokens_computed"]))
            if "arrival" in res:
                figures[f"{w}_speedup_grouped_vs_arrival"] = res["arrival"]["elapsed_s"] / g["elapsed_s"]
            if "grouped_nocascade" in res:
                figures[f"{w}_speedup_cascade"] = res["grouped_nocascade"]["elapsed_s"] / g["elapsed_s"]
        if "arrival" in res and "off" in res:
            figures[f"{w}_speedup_arrival_vs_off"] = res["off"]["elapsed_s"] / res["arrival"]["elapsed_s"]

    model = args.dummy_weights if args.dummy_weights and "/" not in args.dummy_weights else (
        "dummy" if args.dummy_weights else args.model)
    name = args.name or f"prefix-{model}-{'gpu' if args.device != 'cpu' else 'cpu'}"
    out = write_result(name, figures, baseline, dev, out_dir=args.out_dir, extra={
        "workload": {"model": model, "dummy_weights": bool(args.dummy_weights), "workloads": names,
                     "scale": args.scale, "len_scale": args.len_scale,
                     "questions_per_template": args.questions_per_template, "output_len": args.output_len,
                     "cache_fraction": args.cache_fraction, "floor_seqs": args.floor_seqs,
                     "max_num_seqs": args.max_num_seqs,
                     "max_num_batched_tokens": args.max_num_batched_tokens, "max_inflight": max_inflight,
                     "feed": args.feed, "gate": args.gate, "modes": modes, "seed": args.seed,
                     "cascade": args.cascade, "repeats": args.repeats,
                     "num_scheduler_steps": args.num_scheduler_steps},
        "details": details})
    print(f"wrote {out}")
    print_table(f"{name} on {dev}: prefix caching and grouping (feed {args.feed}, "
                f"max_num_seqs {args.max_num_seqs}, in flight {max_inflight})", table,
                ["prompt_tokens", "prefill_tokens_computed", "hit_rate", "hit_rate_of_best", "output_tok_s",
                 "elapsed_s", "preemptions"])
    speed = [(w, {k: figures.get(f"{w}_{k}", "-") for k in
                  ("speedup_grouped_vs_off", "speedup_grouped_vs_arrival", "speedup_arrival_vs_off",
                   "speedup_cascade", "cache_fraction_actual", "best_hit_rate")}) for w in names]
    print_table("speedups (time to finish)", speed, ["speedup_grouped_vs_off", "speedup_grouped_vs_arrival",
                                                     "speedup_arrival_vs_off", "speedup_cascade", "cache_fraction_actual",
                                                     "best_hit_rate"])
    return {"figures": figures, "baseline": baseline, "details": details, "path": str(out)}


if __name__ == "__main__":
    main()
