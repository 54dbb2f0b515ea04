"""Host time a speculating engine spends per step at a large batch, this tree against another
revision's (CPU, a tiny random model; no GPU).

On the H200 in bf16 a SmolLM2 step at batch 256 is about 1.9 ms, so whatever a speculating engine
does on the host that a plain one does not (the governor, the controller's choice, the proposer's
looks at requests, indexing finished outputs, garbage collections of its indexes) shows as a
slowdown there, although nothing drafts. This runs the same job, batch 256 with outputs of
16-96 tokens (the batch shrinks as they finish, through sizes where drafting is considered),
on a tiny random Llama with n-gram and suffix speculation, times every call into the
speculation machinery and every garbage collection, and reports them per step; the baseline
tree runs the same code in a subprocess (`--baseline-rev`, unpacked with `git archive`).

    python -m bench.spec_host_cost --baseline-rev 24e133b
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}


def _job(seed: int, batch: int) -> tuple[list[list[int]], list[int]]:
    """Prompts of 150-360 tokens that repeat a segment (copyable), and output lengths 16-96."""
    rng = random.Random(seed)
    prompts, lengths = [], []
    for _ in range(batch):
        seg = [rng.randrange(3, 500) for _ in range(rng.randint(30, 40))]
        prompts.append(seg * rng.randint(5, 9))
        lengths.append(rng.randint(16, 96))
    return prompts, lengths


def worker(method: str, batch: int, runs: int, seed: int) -> dict:
    """Figures for one method (None: speculation off), in this process's `engine`."""
    import torch

    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    torch.manual_seed(seed)
    d = tempfile.mkdtemp(prefix="prefixq-tiny-llama-")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(TINY_LLAMA, f)
    kw = dict(speculative_method=method) if method else {}
    eng = LLMEngine(d, tokenizer=None, device="cpu", load_format="dummy", max_num_seqs=batch,
                    max_num_batched_tokens=16384, kv_cache_memory=512 << 20, async_scheduling=True, **kw)
    acc: dict[str, float] = defaultdict(float)
    if eng.spec is not None:
        for name in ("should_speculate", "clear_drafts", "draft_ahead", "observe", "on_finished", "on_added"):
            fn = getattr(eng.spec, name)

            def timed(*a, _fn=fn, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    acc["spec"] += time.perf_counter() - t0
            setattr(eng.spec, name, timed)
    gc_t0 = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        else:
            acc["gc"] += time.perf_counter() - gc_t0[0]
    prompts, lengths = _job(seed, batch)

    def run(tag: str) -> tuple[float, int]:
        t0, s0 = time.perf_counter(), eng.counters["steps"]
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, detokenize=False)
            eng.add_request(f"{tag}-{i}", p, sp, job_id=tag)
        while eng.has_unfinished():
            eng.step()
        return time.perf_counter() - t0, eng.counters["steps"] - s0
    run("warm-up")
    gc.collect()
    gc.callbacks.append(on_gc)
    try:
        best = None
        for r in range(runs):
            acc.clear()
            wall, steps = run(f"run-{r}")
            fig = {"wall_ms": wall * 1e3, "steps": steps, "spec_host_ms_per_step": acc["spec"] * 1e3 / steps,
                   "gc_ms_per_run": acc["gc"] * 1e3}
            if best is None or fig["spec_host_ms_per_step"] < best["spec_host_ms_per_step"]:
                best = fig
    finally:
        gc.callbacks.remove(on_gc)
    return best


def _run_tree(tree: str, method: str | None, args) -> dict:
    """`worker` in a subprocess whose `engine` comes from `tree` (this file's code measures)."""
    code = ("import sys, json, importlib.util as u; sys.path[:0] = [sys.argv[1]]; "
            "s = u.spec_from_file_location('spec_host_cost', sys.argv[2]); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); "
            "print(json.dumps(m.worker(sys.argv[3] or None, int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))))")
    out = subprocess.check_output([sys.executable, "-c", code, tree, os.path.abspath(__file__), method or "",
                                   str(args.batch), str(args.runs), str(args.seed)], cwd=tree, text=True,
                                  env={**os.environ, "PYTHONPATH": tree}, stderr=subprocess.DEVNULL)
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-rev", default="24e133b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per method; the lowest host time counts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from bench.common import device_name, print_table, write_result
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = tempfile.mkdtemp(prefix=f"prefixq-{args.baseline_rev}-")
    archive = subprocess.run(["git", "archive", args.baseline_rev, "engine", "kernels"], cwd=here,
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
    figures, baseline, rows = {}, {}, []
    for method in (None, "ngram", "suffix"):
        label = method or "off"
        for tree, target, name in ((here, figures, "this tree"), (base, baseline, args.baseline_rev)):
            fig = _run_tree(tree, method, args)
            for k, v in fig.items():
                target[f"{label}_{k}"] = v
            rows.append((f"{label} {name}", fig))
    for m in ("ngram", "suffix"):
        figures[f"{m}_spec_host_speedup"] = baseline[f"{m}_spec_host_ms_per_step"] / figures[f"{m}_spec_host_ms_per_step"]
    dev = device_name("cpu")
    path = write_result("spec-host-cost-cpu", figures, baseline, dev, extra={"workload": {
        "batch": args.batch, "runs": args.runs, "seed": args.seed, "model": "tiny random Llama (2 layers, 64 wide)",
        "outputs": "16-96 tokens", "baseline": f"engine at {args.baseline_rev}"}})
    print_table(f"speculation's host time per step at batch {args.batch}, CPU ({dev})", rows,
                ["spec_host_ms_per_step", "gc_ms_per_run", "wall_ms", "steps"])
    print(f"wrote {path}")
    return {"figures": figures, "baseline": baseline}


if __name__ == "__main__":
    main()
