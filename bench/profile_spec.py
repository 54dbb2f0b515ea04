"""Host-side profile of speculative steps on the GPU (diagnostics; prints the top functions).

    python -m bench.profile_spec --model smollm2 --batch 8
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--method", default="ngram")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from bench.spec import make_engine, run_mode, workloads
    from engine.model_source import resolve_model
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    wl = workloads(args.batch, random.Random(0))
    prompts = [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False) for m in wl["extract"][:args.batch]]
    kw = dict(model=path, tokenizer=tok, device="cuda", dtype=args.dtype, max_num_seqs=256, max_model_len=2048,
              num_gpu_blocks_override=8192)
    for label, extra in (("off", {}), (args.method, dict(speculative_method=args.method, num_speculative_tokens=4))):
        eng = make_engine(dict(kw, **extra))
        for rep in range(2):  # the second repetition is warm
            pr = cProfile.Profile()
            pr.enable()
            t0 = time.monotonic()
            fig, _ = run_mode(eng, prompts, 128)
            pr.disable()
            print(f"== {label} rep {rep}: {fig} in {time.monotonic() - t0:.2f}s, timings {eng.timings}")
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        # Device side: which kernels the steps spend their GPU time in.
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run_mode(eng, prompts, 32)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
        del eng
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
