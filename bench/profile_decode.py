"""Where a decode step's time goes at a large batch with a shared prefix (diagnostics).

Fills the engine with `--batch` requests that share a `--prefix`-token system prompt, lets
them all reach decode, then measures per decode step: the period between steps, the GPU
time of the forward alone (graph replay, timed with CUDA events), the host time the step
spends outside waiting for the GPU, and the top host functions and GPU kernels.

    python -m bench.profile_decode --dummy-weights qwen3-0.6b --batch 256 --prefix 1024
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
import types
from collections import defaultdict

import torch


def _phase_times(eng, steps: int) -> dict[str, float]:
    """Seconds per step spent in each part of the engine's step, on the host."""
    import engine.llm_engine as le
    from bench.profile_spec import _timed
    acc: dict[str, float] = defaultdict(float)
    undo = []

    def wrap(obj, name, label):  # the spec profile's timer, remembering what to restore
        undo.append((obj, name, getattr(obj, name)))
        _timed(obj, name, acc, label)

    wrap(eng.scheduler, "schedule", "schedule")
    wrap(eng.runner, "prepare", "prepare")
    wrap(eng.runner, "forward", "forward launch")
    wrap(le, "sample", "sample launch")
    wrap(le._Inflight, "copy_to_host", "copy to host")
    wrap(le._Inflight, "wait", "wait for GPU")
    wrap(eng, "_finish", "finish (incl. wait)")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    acc["period"] = time.perf_counter() - t0
    for obj, name, fn in reversed(undo):
        if isinstance(obj, (type, types.ModuleType)):
            setattr(obj, name, fn)
        else:
            delattr(obj, name)  # the instance's wrapper hid the class's method
    return {k: v / steps for k, v in acc.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dummy-weights", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cascade", default="auto,off",
                    help="comma list of cascade settings to compare: auto, on (forced, any KV width), off")
    args = ap.parse_args(argv)
    settings = {"auto": "auto", "on": True, "off": False}
    from engine.llm_engine import LLMEngine
    from engine.models.shapes import dummy_model_dir
    from engine.sampling_params import SamplingParams
    path = dummy_model_dir(args.dummy_weights)
    rng = random.Random(0)
    system = [rng.randrange(100, 30000) for _ in range(args.prefix)]
    prompts = [system + [rng.randrange(100, 30000) for _ in range(rng.randint(64, 256))] for _ in range(args.batch)]
    sp = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True, detokenize=False)
    for cascade in (settings[c] for c in args.cascade.split(",")):
        eng = LLMEngine(path, tokenizer=None, load_format="dummy", max_model_len=4096, cascade_attention=cascade,
                        num_gpu_blocks_override=args.batch * 40 + 200)
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, sp)
        while eng.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running):
            eng.step()
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
        # 1) the steady period
        t0 = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
        period = (time.perf_counter() - t0) / args.steps
        # 1b) host time per phase of the step (wrappers around the engine's parts)
        phases = _phase_times(eng, args.steps)
        print("host ms per step by phase: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in phases.items()))
        # 2) host time outside the wait for the GPU, with the top host functions
        waited = [0.0]
        import engine.llm_engine as le
        orig_wait = le._Inflight.wait

        def timed_wait(self):
            t = time.perf_counter()
            r = orig_wait(self)
            waited[0] += time.perf_counter() - t
            return r
        le._Inflight.wait = timed_wait
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        for _ in range(args.steps):
            eng.step()
        pr.disable()
        torch.cuda.synchronize()
        prof_period = (time.perf_counter() - t0) / args.steps
        le._Inflight.wait = orig_wait
        # 3) the forward alone
        if eng._inflight is not None:
            eng._finish(eng._inflight)
            eng._inflight = None
        batch = eng.scheduler.schedule()
        inp = eng.runner.prepare(batch, None, eng.block_manager.table)
        eng.runner.forward(inp)
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(20):
            eng.runner.forward(inp)
        e1.record()
        torch.cuda.synchronize()
        gpu_ms = e0.elapsed_time(e1) / 20
        print(f"=== cascade={cascade}: batch {len(batch.requests)}, cascade plan: {inp.meta.cascade is not None}, "
              f"graph: {bool(eng.runner.graphs)}")
        print(f"period {period * 1e3:.2f} ms/step; forward alone {gpu_ms:.2f} ms; under cProfile "
              f"{prof_period * 1e3:.2f} ms/step of which waiting for the GPU {waited[0] / args.steps * 1e3:.2f} ms")
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)
        # 4) kernels of one eager forward
        saved = eng.runner.graphs, eng.runner.cascade_graphs
        eng.runner.graphs, eng.runner.cascade_graphs = {}, {}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eng.runner.forward(inp)
            torch.cuda.synchronize()
        eng.runner.graphs, eng.runner.cascade_graphs = saved
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
        del eng
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
