"""Where a speculating step's time goes, on the GPU (diagnostics, no results file): per step,
the host time of each phase (drafting, scheduling, input preparation, the forward's launch,
sampling or verification, waiting for the step in flight, finishing), the GPU's kernel time,
and the step period, for speculation off and on.

    python -m bench.profile_spec --batch 1,32 --method ngram
"""
from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

import torch


def _timed(obj, name: str, acc: dict, label: str | None = None) -> None:
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[label or name] += time.perf_counter() - t0
    setattr(obj, name, wrapper)


def profile_engine(eng, prompts, max_tokens: int, torch_profile: bool = True) -> dict:
    import engine.llm_engine as le
    from bench.spec import run_mode
    acc: dict[str, float] = defaultdict(float)
    _timed(eng.scheduler, "schedule", acc)
    _timed(eng.runner, "prepare", acc)
    _timed(eng.runner, "forward", acc)
    _timed(eng, "_finish", acc, "finish (incl. wait)")
    if eng.spec is not None:
        _timed(eng.spec, "draft_ahead", acc)
        _timed(eng.spec, "verify", acc)
    real_sample, real_wait = le.sample, le._Inflight.wait

    def sample(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real_sample(*a, **kw)
        finally:
            acc["sample"] += time.perf_counter() - t0

    def wait(self):
        t0 = time.perf_counter()
        try:
            return real_wait(self)
        finally:
            acc["wait"] += time.perf_counter() - t0
    le.sample, le._Inflight.wait = sample, wait
    try:
        steps0 = eng.counters["steps"]
        fig, _ = run_mode(eng, prompts, max_tokens)
        steps = eng.counters["steps"] - steps0
        gpu_us, gsteps = 0.0, 0
        if torch.cuda.is_available() and torch_profile:
            from torch.profiler import ProfilerActivity, profile
            s1 = eng.counters["steps"]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run_mode(eng, prompts, max_tokens)
            ka = prof.key_averages()
            gpu_us = sum(e.self_device_time_total for e in ka)
            gsteps = eng.counters["steps"] - s1
            # Host calls that cost the most (CUDA runtime calls show waits and allocations).
            top = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:12]
            print("   host top: " + "; ".join(f"{e.key[:40]} {e.self_cpu_time_total / max(1, gsteps):.0f}us/step "
                                           f"x{e.count / max(1, gsteps):.1f}" for e in top), flush=True)
    finally:
        le.sample, le._Inflight.wait = real_sample, real_wait
    out = {"spec_mode": round(fig["spec_mode_steps"] / max(1, fig["steps"]), 2),
           "verif_per_step": round(fig["verifications"] / max(1, fig["steps"]), 2),
           "tok_s": round(fig["tok_s"], 1), "tokens_per_step": round(fig["tok_s"] * fig["elapsed_s"] / steps, 2),
           "period_ms": round(1e3 * fig["elapsed_s"] / steps, 3), "gpu_ms": round(gpu_us / 1e3 / max(1, gsteps), 3)}
    # (the profiled pass counts too in acc: per step over both passes)
    for k, v in sorted(acc.items()):
        out[f"{k}_ms"] = round(1e3 * v / (steps + gsteps), 3)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--method", default="ngram")
    ap.add_argument("--workload", default="extract")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-torch-profile", action="store_true", help="phase timers only (faster)")
    ap.add_argument("--compare-ahead", action="store_true",
                    help="also run the method with speculative_draft_ahead=True (no wait after plain steps)")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from bench.spec import chat_tokens, make_engine, run_mode, workloads
    from engine.model_source import resolve_model
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    batches = [int(b) for b in args.batch.split(",")]
    wl = workloads(max(batches), random.Random(0))
    prompts = [chat_tokens(tok, m) for m in wl[args.workload]]
    kw = dict(model=path, tokenizer=tok, device=args.device, dtype=args.dtype, max_num_seqs=256, max_model_len=2048,
              num_gpu_blocks_override=8192)
    spec = dict(speculative_method=args.method)  # (the engine's default k)
    variants = [("off", {}), (args.method, spec)]
    if args.compare_ahead:
        variants.append((f"{args.method}-ahead", dict(spec, speculative_draft_ahead=True)))
    for label, extra in variants:
        eng = make_engine(dict(kw, **extra))
        for b in batches:
            run_mode(eng, prompts[:b], args.max_tokens // 2)  # warm: indexes, the governor's first samples
            print(f"== {label} b={b}: {profile_engine(eng, prompts[:b], args.max_tokens, not args.no_torch_profile)}", flush=True)
            if eng.spec is not None:
                c, g = eng.spec.controller, eng.spec.governor
                print(f"   controller: recent acceptance {c.recent_acceptance():.2f}, learned overhead "
                      f"{ {k: round(v, 2) for k, v in c._sync.items()} }; governor rates (spec, plain) "
                      f"{g.rate(b, True) if g else None}, {g.rate(b, False) if g else None}", flush=True)
        del eng
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
