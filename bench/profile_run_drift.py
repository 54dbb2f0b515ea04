"""Does an engine's step time drift over repeated runs, and why (diagnostics, GPU, no results file)?

A worker's engine runs job after job; with prefix caching every freed KV block stays cached, so
after a few runs new requests get blocks in a scrambled order, scattered over the whole pool.
This checks, on the SmolLM2 shape in bf16 (random weights), whether that slows steps down:

1. the decode-attention kernel alone, batch 256 at 350 tokens of context, with block tables
   that are sequential, interleaved across sequences, or a random permutation of the pool
   (one layer's cache, then thirty layers' caches read in turn as a forward does);
2. six runs of 256 requests on one engine, with the free queue as the engine leaves it
   (`plain`), put back in block order with the prefix cache emptied before each run (`sorted`),
   the cache emptied only (`reset`), or the order restored with the cache kept (`sortkeep`);
   each run prints its median step and the host time of the block manager and scheduler.

    python -m bench.profile_run_drift

Measured on the H200 (c165560): the kernel took the same time in every order (85.8 / 80.9 / 82.9
us; 30 layers 2,368 / 2,304 / 2,273 us), and the engine's median step moved between 1.7 and 3.6
ms from run to run in every variant, with every host function's time scaling together: the lent
machine's host speed, not the KV block order.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict

import torch


def _time_kernel(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / iters * 1000  # microseconds


def kernel_orders(batch: int, context: int, pool: int, layers: int) -> None:
    from kernels.decode_attention import paged_decode_attention
    dev, bs = "cuda", 16
    nb = -(-context // bs)
    q = torch.randn(batch, 9, 64, device=dev, dtype=torch.bfloat16)
    ctx = torch.full((batch,), context, dtype=torch.int32, device=dev)
    tables = {
        "sequential": torch.arange(batch * nb, dtype=torch.int32, device=dev).view(batch, nb),
        "interleaved": torch.arange(batch * nb, dtype=torch.int32, device=dev).view(nb, batch).t().contiguous(),
        "random": torch.randperm(pool, device=dev)[:batch * nb].to(torch.int32).view(batch, nb),
    }
    kc = [torch.randn(pool, bs, 3, 64, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    vc = [torch.randn_like(kc[0]) for _ in range(layers)]
    for name, bt in tables.items():
        one = _time_kernel(lambda: paged_decode_attention(q, kc[0], vc[0], bt, ctx, 0.125), 200)
        every = _time_kernel(lambda: [paged_decode_attention(q, kc[i], vc[i], bt, ctx, 0.125)
                                      for i in range(layers)], 20)
        print(f"kernel, {name} blocks: {one:.1f} us one layer, {every:.1f} us for {layers} layers", flush=True)


def engine_runs(variant: str, runs: int, batch: int, pool: int) -> None:
    from bench.profile_spec import _timed
    from engine.block_manager import FreeBlockQueue
    from engine.llm_engine import LLMEngine
    from engine.models.shapes import dummy_model_dir
    from engine.sampling_params import SamplingParams
    eng = LLMEngine(dummy_model_dir("smollm2-135m"), tokenizer=None, load_format="dummy", dtype="bfloat16",
                    max_num_seqs=batch, max_model_len=2048, num_gpu_blocks_override=pool,
                    kv_cache_memory=1 << 30)
    acc: dict[str, float] = defaultdict(float)
    bm = eng.block_manager
    for name in ("allocate_slots", "free", "cache_full_blocks", "get_computed_blocks"):
        _timed(bm, name, acc)
    _timed(eng.scheduler, "schedule", acc)
    rng = random.Random(0)
    sp = SamplingParams(max_tokens=128, temperature=0, detokenize=False, ignore_eos=True)
    for run in range(runs):
        if variant in ("sorted", "reset"):
            bm.reset_prefix_cache()
        if variant in ("sorted", "sortkeep"):
            bm.free_queue = FreeBlockQueue([b for b in bm.blocks if b.ref_cnt == 0])
        for i in range(batch):
            prompt = [rng.randrange(3, 40000) for _ in range(rng.randint(180, 260))]
            eng.add_request(f"{run}-{i}", prompt, sp)
        torch.cuda.synchronize()
        t0, steps = time.perf_counter(), []
        while eng.has_unfinished():
            s = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
        host = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in acc.items())
        print(f"engine, {variant}, run {run}: {wall * 1e3:.0f} ms, {len(steps)} steps, median step "
              f"{statistics.median(steps) * 1e3:.2f} ms; host ms: {host}", flush=True)
        acc.clear()
    del eng
    torch.cuda.empty_cache()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=350)
    ap.add_argument("--pool", type=int, default=8192, help="KV blocks")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--variants", default="plain,sorted,reset,sortkeep")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU")
    kernel_orders(args.batch, args.context, args.pool, args.layers)
    for variant in args.variants.split(","):
        engine_runs(variant, args.runs, args.batch, args.pool)


if __name__ == "__main__":
    main()
