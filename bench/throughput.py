"""Offline throughput, mirroring `vllm bench throughput`: our engine against
transformers `generate` (static padded batches) and `generate_batch` (continuous
batching), measured in the same run on the same device.

    python -m bench.throughput --dummy-weights qwen3-0.6b --input-len 100:1024 --output-len 100:1024 --num-prompts 256
    python -m bench.throughput --model smollm2 --device cpu --num-prompts 16 --input-len 64 --output-len 32
"""
from __future__ import annotations

import argparse
import gc
import inspect
import random
import time

import torch

from bench.common import (copy_bandwidth_gbs, device_name, percentile, print_table, random_lengths,
                          random_prompts, write_result)


def model_path(args) -> str:
    if args.dummy_weights:
        from engine.models.shapes import dummy_model_dir
        return dummy_model_dir(args.dummy_weights)
    from engine.model_source import resolve_model
    return resolve_model(args.model)


def run_ours(args, path, prompts, out_lens) -> tuple[dict, object]:
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    kw = dict(device=args.device, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=max(map(len, prompts)) + max(out_lens) + 16, enable_prefix_caching=not args.no_prefix_caching,
              num_scheduler_steps=args.num_scheduler_steps)
    if args.dummy_weights:
        kw["load_format"] = "dummy"
    if args.device == "cpu":
        kw["kv_cache_memory"] = args.kv_cache_memory
    eng = LLMEngine(path, **kw)
    # Warm-up outside the timing: compiles kernels for prefill shapes.
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, detokenize=False)
    for i in range(min(32, len(prompts))):  # batches of several sizes: kernels compile here, not in the timing
        eng.add_request(f"w{i}", prompts[i], warm)
    while eng.has_unfinished():
        eng.step()
    fig, outs = timed_run(eng, args, prompts, out_lens)
    if args.caching_overhead:
        fig.update(caching_overhead(eng, args, prompts, out_lens, args.caching_overhead))
    del eng
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return fig, outs


def timed_run(eng, args, prompts, out_lens) -> tuple[dict, list]:
    """One timed pass over every prompt on a warm engine with an empty prefix cache."""
    from engine.sampling_params import SamplingParams
    for k in eng.timings:
        eng.timings[k] = 0 if k == "steps" else 0.0
    eng.step_log = []
    eng._last_finish = time.perf_counter()
    eng.block_manager.reset_prefix_cache()
    t0 = time.monotonic()
    for i, (p, n) in enumerate(zip(prompts, out_lens)):
        eng.add_request(str(i), p, SamplingParams(max_tokens=n, temperature=args.temperature, ignore_eos=True,
                                                  detokenize=False))
    outs = []
    while eng.has_unfinished():
        outs.extend(eng.step())
    elapsed = time.monotonic() - t0
    assert len(outs) == len(prompts) and all(o.finish_reason == "length" for o in outs), "requests failed"
    gen = sum(len(o.token_ids) for o in outs)
    ptoks = sum(map(len, prompts))
    ttft = [o.first_token_time - t0 for o in outs]
    decode = [(dt, b, ctx) for dt, is_dec, b, ctx in eng.step_log if is_dec]
    tm = eng.timings
    steps = max(1, tm["steps"])
    fig = {
        "output_tok_s": gen / elapsed, "total_tok_s": (gen + ptoks) / elapsed, "elapsed_s": elapsed,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "decode_step_ms": 1e3 * sum(d for d, _, _ in decode) / max(1, len(decode)),
        "steps": tm["steps"], "decode_steps": len(decode),
        "overhead_schedule_ms": 1e3 * tm["schedule_s"] / steps, "overhead_prepare_ms": 1e3 * tm["prepare_s"] / steps,
        "overhead_update_ms": 1e3 * tm["update_s"] / steps, "forward_sample_ms": 1e3 * tm["forward_sample_s"] / steps,
        "preemptions": eng.scheduler.num_preemptions, "num_kv_blocks": eng.block_manager.num_blocks,
    }
    if eng.device.type == "cuda" and decode:
        # Bytes a decode step must read: all weights once plus each sequence's KV.
        w_bytes = sum(p.numel() * p.element_size() for p in eng.runner.model.parameters())
        kv_tok = eng.runner.kv_bytes_per_block // eng.config.block_size
        big = [(dt, b, ctx) for dt, b, ctx in decode if b >= 128] or decode
        bw = [(w_bytes + ctx * kv_tok) / dt / 1e9 for dt, b, ctx in big]
        fig["decode_bandwidth_gbs"] = sum(bw) / len(bw)
        fig["decode_batch_mean"] = sum(b for _, b, _ in big) / len(big)
    return fig, outs


def caching_overhead(eng, args, prompts, out_lens, reps: int) -> dict:
    """Prefix caching's cost when nothing is shared: the same engine and prompts (random tokens,
    so no block repeats), caching off and on alternately, best of `reps` each."""
    best = {False: 0.0, True: 0.0}
    for _ in range(reps):
        for caching in (False, True):
            eng.block_manager.enable_prefix_caching = caching  # the engine reads only this flag
            fig, _ = timed_run(eng, args, prompts, out_lens)
            best[caching] = max(best[caching], fig["output_tok_s"])
    eng.block_manager.enable_prefix_caching = not args.no_prefix_caching
    return {"nothing_shared_caching_off_tok_s": best[False], "nothing_shared_caching_on_tok_s": best[True],
            "prefix_caching_overhead_pct": 100 * (1 - best[True] / best[False])}


def load_hf(path, args):
    from transformers import AutoConfig, AutoModelForCausalLM
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    dev = "cuda" if args.device != "cpu" else "cpu"
    if args.dummy_weights:
        cfg = AutoConfig.from_pretrained(path)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(dev)
    return model.eval()


def run_hf_generate(model, prompts, out_lens, batch_size: int) -> dict:
    """Static padded batches (left padding), every row runs to the batch's longest output."""
    dev = next(model.parameters()).device
    gen_useful, t0 = 0, time.monotonic()
    ttft_proxy = []
    for s in range(0, len(prompts), batch_size):
        ps, ns = prompts[s:s + batch_size], out_lens[s:s + batch_size]
        L = max(map(len, ps))
        ids = torch.zeros(len(ps), L, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(ps):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        with torch.no_grad():
            model.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max(ns), min_new_tokens=max(ns),
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        gen_useful += sum(ns)
        ttft_proxy.append(time.monotonic() - t0)
    elapsed = time.monotonic() - t0
    ptoks = sum(map(len, prompts))
    return {"output_tok_s": gen_useful / elapsed, "total_tok_s": (gen_useful + ptoks) / elapsed, "elapsed_s": elapsed,
            "num_prompts": len(prompts), "batch_size": batch_size}


def run_hf_generate_batch(model, prompts, out_lens) -> dict:
    """transformers continuous batching (paged|sdpa), with a sized cache config."""
    from transformers import GenerationConfig
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        ContinuousBatchingConfig = None
    model.config._attn_implementation = "paged|sdpa"
    gc_ = GenerationConfig(max_new_tokens=max(out_lens), min_new_tokens=max(out_lens), do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    kw = {}
    if ContinuousBatchingConfig is not None:
        want = dict(max_memory_percent=0.5, max_batch_tokens=2048, block_size=256, page_size=256)
        ok = inspect.signature(ContinuousBatchingConfig).parameters
        kw["continuous_batching_config"] = ContinuousBatchingConfig(**{k: v for k, v in want.items() if k in ok})
    t0 = time.monotonic()
    res = model.generate_batch(inputs=prompts, generation_config=gc_, **kw)
    elapsed = time.monotonic() - t0
    bad = [r for r in res.values() if getattr(r, "error", None)]
    if bad:
        raise RuntimeError(f"generate_batch reported {len(bad)} failed requests: {bad[0].error}")
    gen = sum(len(r.generated_tokens) for r in res.values())
    ptoks = sum(map(len, prompts))
    return {"output_tok_s": gen / elapsed, "total_tok_s": (gen + ptoks) / elapsed, "elapsed_s": elapsed,
            "num_prompts": len(prompts)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dummy-weights", default=None, help="random weights in a named shape: qwen3-0.6b, llama-3.1-8b, smollm2-135m")
    ap.add_argument("--input-len", default="128")
    ap.add_argument("--output-len", default="256")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--kv-cache-memory", type=int, default=512 << 20)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--num-scheduler-steps", type=int, default=1, help="decode steps per host step (decode bursts)")
    ap.add_argument("--caching-overhead", type=int, default=0, metavar="REPS",
                    help="also time caching off and on alternately REPS times each (nothing is shared)")
    ap.add_argument("--baselines", default="generate,generate_batch", help="comma list, or 'none'")
    ap.add_argument("--hf-num-prompts", type=int, default=None, help="run baselines on the first N prompts only")
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--name", default=None, help="result file name (bench/results/<name>.json)")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    rng = random.Random(args.seed)
    path = model_path(args)
    import json
    vocab = json.load(open(f"{path}/config.json"))["vocab_size"]
    in_lens = random_lengths(args.num_prompts, args.input_len, rng)
    out_lens = random_lengths(args.num_prompts, args.output_len, rng)
    prompts = random_prompts(in_lens, min(vocab, 49152), rng)

    figures = {}
    if args.device != "cpu":
        figures["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    ours, _ = run_ours(args, path, prompts, out_lens)
    figures.update(ours)
    if "decode_bandwidth_gbs" in figures:
        figures["decode_bandwidth_pct_of_copy"] = 100 * figures["decode_bandwidth_gbs"] / figures["copy_bandwidth_gbs"]
    rows = [("prefixq", figures)]

    baseline, best = {}, None
    names = [] if args.baselines == "none" else args.baselines.split(",")
    n_hf = args.hf_num_prompts or args.num_prompts
    if names:
        model = load_hf(path, args)
        for name in names:
            try:
                if name == "generate":
                    r = run_hf_generate(model, prompts[:n_hf], out_lens[:n_hf], args.hf_batch_size)
                elif name == "generate_batch":
                    r = run_hf_generate_batch(model, prompts[:n_hf], out_lens[:n_hf])
                else:
                    raise ValueError(f"unknown baseline {name}")
            except Exception as e:  # a baseline that cannot run is reported, not fatal
                print(f"baseline {name} failed: {type(e).__name__}: {e}")
                continue
            rows.append((f"transformers {name}", r))
            baseline.update({f"{name}_{k}": v for k, v in r.items()})
            if best is None or r["output_tok_s"] > best:
                best = r["output_tok_s"]
        del model
    if best:
        figures["speedup_vs_best_transformers"] = figures["output_tok_s"] / best
    dev = device_name(args.device)
    name = args.name or f"throughput-{args.dummy_weights or args.model}-{'gpu' if args.device != 'cpu' else 'cpu'}"
    path_out = write_result(name, figures, baseline, dev, extra={"workload": {
        "model": args.dummy_weights or args.model, "dummy_weights": bool(args.dummy_weights),
        "input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
        "baseline_num_prompts": n_hf, "seed": args.seed, "num_scheduler_steps": args.num_scheduler_steps}})
    print_table(f"{name} on {dev} ({args.num_prompts} prompts, in {args.input_len}, out {args.output_len})",
                rows, ["output_tok_s", "total_tok_s", "elapsed_s"])
    print(f"ours: TTFT p50 {figures['ttft_p50_s']:.3f}s p99 {figures['ttft_p99_s']:.3f}s, "
          f"decode step {figures['decode_step_ms']:.2f} ms, overhead/step: schedule "
          f"{figures['overhead_schedule_ms']:.2f} ms, prepare {figures['overhead_prepare_ms']:.2f} ms, "
          f"update {figures['overhead_update_ms']:.2f} ms")
    if "decode_bandwidth_gbs" in figures:
        print(f"decode bandwidth {figures['decode_bandwidth_gbs']:.0f} GB/s = "
              f"{figures['decode_bandwidth_pct_of_copy']:.1f}% of copy ({figures['copy_bandwidth_gbs']:.0f} GB/s)")
    print(f"wrote {path_out}")
    return figures


if __name__ == "__main__":
    main()
