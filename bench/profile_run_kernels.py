"""Which GPU kernels a whole spec-benchmark run spends its time in (diagnostics, no results file).

Runs one of bench.spec's workloads at a batch size (its number of requests, admissions as
requests finish), once to warm up and once under the torch profiler, for speculation off and
for a method, and prints each run's wall time, GPU kernel time and the kernels that took the
most, with their calls and mean time.

    python -m bench.profile_run_kernels --workload json --batch 32 --method ngram
"""
from __future__ import annotations

import argparse
import random


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--workload", default="json")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--method", default="ngram")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer

    from bench.spec import chat_tokens, make_engine, run_mode, workloads
    from engine.model_source import resolve_model
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    n = max(args.batch, 16, 4 * args.batch if args.batch <= 32 else args.batch)  # as bench.spec
    prompts = [chat_tokens(tok, m) for m in workloads(256, random.Random(0))[args.workload][:n]]
    base = dict(model=path, tokenizer=tok, device="cuda", dtype="float32", seed=0, max_num_seqs=256,
                max_model_len=2048, num_gpu_blocks_override=8192, kv_cache_memory=1 << 30)
    for label, extra in (("off", {}), (args.method, dict(speculative_method=args.method, num_speculative_tokens=8))):
        eng = make_engine(dict(base, **extra))
        run_mode(eng, prompts, args.max_tokens, args.batch)  # warm-up
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fig, _ = run_mode(eng, prompts, args.max_tokens, args.batch)
        ka = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        gpu_ms = sum(e.self_device_time_total for e in ka) / 1e3
        print(f"== {args.workload} b={args.batch} {label}: {fig['elapsed_s'] * 1e3:.0f} ms wall, {fig['steps']} steps, "
              f"GPU kernels {gpu_ms:.0f} ms", flush=True)
        for e in sorted(ka, key=lambda e: -e.self_device_time_total)[:args.top]:
            print(f"   {e.self_device_time_total / 1e3:8.1f} ms  x{e.count:<6d} {e.self_device_time_total / e.count:8.1f} us  "
                  f"{e.key[:90]}")
        del eng
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
