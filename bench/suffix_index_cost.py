"""Host cost of the suffix proposer's index, this tree against another revision's (CPU, no model).

The suffix proposer's host time decides whether it pays at batch 8-32 (on the H200 a SmolLM2
step is 2-3 ms, and a proposal that costs 100 us a request eats a step's worth at batch 32).
This times, for `SuffixIndex` here and at `--baseline-rev` (loaded from git), in one
run: indexing a 1,000-token prompt (a request's first proposal), indexing a 128-token finished
output into a job index (every output of a job), appending 3 tokens to a request's index (a
step's catch-up), and matching a context against a job index of 200 outputs.

    python -m bench.suffix_index_cost --baseline-rev 61774c5
"""
from __future__ import annotations

import argparse
import inspect
import random
import subprocess
import sys
import time
import types

from bench.common import device_name, print_table, write_result


def load_revision(rev: str, paths: tuple[str, ...] = ("engine/spec/suffix_index.py", "engine/spec/suffix.py")
                  ) -> types.ModuleType:
    """The module at a revision from the first of `paths` it has (by default the one holding
    `SuffixIndex`: engine/spec/suffix_index.py since the index got a file of its own,
    engine/spec/suffix.py before)."""
    for path in paths:
        try:
            src = subprocess.check_output(["git", "show", f"{rev}:{path}"], text=True, stderr=subprocess.DEVNULL)
        except subprocess.CalledProcessError:
            continue
        mod = types.ModuleType(f"{path.rsplit('/', 1)[-1][:-3]}_at_{rev}")
        sys.modules[mod.__name__] = mod  # (its dataclasses look their module up)
        exec(compile(src, f"{rev}:{path}", "exec"), mod.__dict__)
        return mod
    raise SystemExit(f"none of {paths} at {rev}")


def _texts(seed: int, prompts: int, outputs: int) -> tuple[list[list[int]], list[list[int]]]:
    """Documents over a small vocabulary (n-grams repeat, as in text), and outputs that copy
    spans of them between template tokens (extraction-like)."""
    rng = random.Random(seed)
    words = [rng.randrange(1000, 40000) for _ in range(300)]
    docs = [[rng.choice(words) for _ in range(1000)] for _ in range(prompts)]
    outs = []
    for _ in range(outputs):
        d, o = rng.choice(docs), []
        while len(o) < 128:
            s = rng.randrange(len(d) - 12)
            o += [11, 12] + d[s:s + rng.randrange(3, 12)] + [13]
        outs.append(o[:128])
    return docs, outs


def _best_us(fn, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        n = fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def measure(mod, docs: list[list[int]], outs: list[list[int]]) -> dict:
    SuffixIndex = mod.SuffixIndex

    def prompts():
        for d in docs:
            SuffixIndex(8, 32).append(d)
        return len(docs)

    def job():
        idx = SuffixIndex(32, 32)
        for o in outs:
            idx.append_sequence(o)
        return len(outs)

    def steps():
        n = 0
        for d in docs[:8]:
            idx = SuffixIndex(8, 32)
            idx.append(d[:400])
            for i in range(400, len(d), 3):
                idx.append(d[i:i + 3])
                n += 1
        return n

    full = SuffixIndex(32, 32)
    for o in outs:
        full.append_sequence(o)
    rng = random.Random(1)
    contexts = []
    for _ in range(500):
        o = rng.choice(outs)
        e = rng.randrange(8, len(o))
        contexts.append(o[max(0, e - 32):e])

    # The engine passes the request's own index (its tokens end with the context) to key the
    # context's suffixes from its prefix hashes, where the index has that parameter.
    with_tail = "tail" in inspect.signature(full.match).parameters
    tails = []
    for c in contexts:
        t = SuffixIndex(8, 32)
        t.append(c)
        tails.append(t)

    def match():
        for c, t in zip(contexts, tails):
            if with_tail:
                full.match(c, 8, 0.1, 1.0, tail=t)
            else:
                full.match(c, 8, 0.1, 1.0)
        return len(contexts)

    return {"prompt_index_us": _best_us(prompts), "job_output_index_us": _best_us(job),
            "step_append_us": _best_us(steps), "job_match_us": _best_us(match)}


def main(argv=None) -> dict:
    import engine.spec.suffix_index as here
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-rev", default="61774c5")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    docs, outs = _texts(args.seed, prompts=32, outputs=200)
    base = load_revision(args.baseline_rev)
    measure(here, docs[:4], outs[:20])  # warm up
    measure(base, docs[:4], outs[:20])
    figures = measure(here, docs, outs)
    baseline = measure(base, docs, outs)
    for k in list(baseline):
        figures[k.replace("_us", "_speedup")] = baseline[k] / figures[k]
    dev = device_name("cpu")
    path = write_result("suffix-index-cost-cpu", figures, baseline, dev, extra={"workload": {
        "prompts": len(docs), "prompt_tokens": 1000, "outputs": len(outs), "output_tokens": 128, "seed": args.seed,
        "baseline": f"SuffixIndex at {args.baseline_rev}"}})
    keys = ["prompt_index_us", "job_output_index_us", "step_append_us", "job_match_us"]
    print_table(f"suffix index host cost on {dev} (us per operation)",
                [("this tree", figures), (args.baseline_rev, baseline)], keys)
    print(f"wrote {path}")
    return {"figures": figures, "baseline": baseline}


if __name__ == "__main__":
    main()
