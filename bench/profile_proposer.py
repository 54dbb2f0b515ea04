"""Where the proposer's host time goes inside real engine runs (diagnostics, no results file).

Wraps the engine's proposer: every call's time, how many requests it served, how many of
them were new to the proposer, how many tokens their indexes had to catch up on, and the
job index's queue of unindexed outputs; prints the costliest calls and a cProfile summary
of the proposer alone. Runs the spec benchmark's workloads, one job per run, as bench.spec
does.

    python -m bench.profile_proposer --workload chat --batch 32 --method suffix
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import time


def instrument(proposer) -> tuple[list[tuple], cProfile.Profile]:
    calls: list[tuple] = []
    prof = cProfile.Profile()
    real = proposer.propose

    def propose(ids, hists, ks, jobs=None):
        seen = getattr(proposer, "_req", None) or getattr(proposer, "_index", {})
        new = sum(1 for i in ids if i not in seen)
        lag = sum(len(h) - len(seen[i]) for i, h in zip(ids, hists) if i in seen and hasattr(seen[i], "__len__"))
        queued = sum(len(j._queued) for j in getattr(proposer, "_jobs", {}).values())
        t0 = time.perf_counter()
        prof.enable()
        try:
            return real(ids, hists, ks, jobs)
        finally:
            prof.disable()
            calls.append(((time.perf_counter() - t0) * 1e3, len(ids), sum(ks), new, lag, queued))
    proposer.propose = propose
    return calls, prof


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--workload", default="chat")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--method", default="suffix")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2, help="timed runs after one warm-up run")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from bench.spec import chat_tokens, make_engine, run_mode, workloads
    from engine.model_source import resolve_model
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    # the spec benchmark's requests per run and engine settings
    n = max(args.batch, 16, 4 * args.batch if args.batch <= 32 else args.batch)
    prompts = [chat_tokens(tok, m) for m in workloads(256, random.Random(0))[args.workload][:n]]
    eng = make_engine(dict(model=path, tokenizer=tok, device=args.device, dtype="float32", seed=0, max_num_seqs=256,
                           max_model_len=2048, num_gpu_blocks_override=8192, kv_cache_memory=1 << 30,
                           speculative_method=args.method, num_speculative_tokens=8))
    run_mode(eng, prompts, args.max_tokens, args.batch)  # warm-up
    calls, prof = instrument(eng.spec.proposer)
    for r in range(args.runs):
        calls.clear()
        fig, _ = run_mode(eng, prompts, args.max_tokens, args.batch)
        total = sum(c[0] for c in calls)
        print(f"== {args.workload} b={args.batch} {args.method} run {r}: {fig['elapsed_s'] * 1e3:.0f} ms, "
              f"{fig['steps']} steps ({fig['spec_mode_steps']} speculating), proposer {len(calls)} calls "
              f"{sum(c[1] for c in calls)} requests {total:.1f} ms", flush=True)
        for c in sorted(calls, reverse=True)[:args.top]:
            print("   %.2f ms: %d requests, %d tokens asked, %d new, %d to catch up, %d outputs queued" % c)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
    print(s.getvalue())


if __name__ == "__main__":
    main()
