"""Host cost of building a request's speculation index over its prompt (CPU, no model).

The suffix proposer indexes every speculating request's prompt once; at large batches that
cost lands on the host between GPU steps. This times building a request index over
1,000-token prompts the way the engine does now (one bulk append, 8-gram depth) against the
earlier way (token by token, 32-gram depth) in the same run, plus the n-gram index.

    python -m bench.proposer_index
"""
from __future__ import annotations

import argparse
import random
import time

from bench.common import device_name, print_table, write_result


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    words = [rng.randrange(1000) for _ in range(300)]  # a document's vocabulary: n-grams repeat
    return [[rng.choice(words) for _ in range(length)] for _ in range(n)]


def _time_ms(build, prompts) -> float:
    t = time.perf_counter()
    for p in prompts:
        build(p)
    return (time.perf_counter() - t) / len(prompts) * 1e3


def main(argv=None) -> dict:
    from engine.spec.ngram import NgramProposer
    from engine.spec.suffix_index import SuffixIndex
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    prompts = _prompts(args.prompts, args.length, args.seed)

    def suffix_now(p):
        SuffixIndex(8, 32).append(p)

    def suffix_before(p):
        idx = SuffixIndex(32, 32)
        for i in range(0, len(p), 16):  # short appends take the token-by-token loop
            idx.append(p[i:i + 16])

    def ngram(p, _prop=NgramProposer(2, 4)):
        _prop.propose(["r"], [p], [4])
        _prop.on_finished("r", [])

    for fn in (suffix_now, suffix_before, ngram):  # warm up
        _time_ms(fn, prompts[:4])
    figures = {"suffix_request_index_ms_per_prompt": _time_ms(suffix_now, prompts),
               "ngram_index_ms_per_prompt": _time_ms(ngram, prompts)}
    baseline = {"suffix_request_index_ms_per_prompt": _time_ms(suffix_before, prompts)}
    figures["suffix_speedup"] = baseline["suffix_request_index_ms_per_prompt"] / \
        figures["suffix_request_index_ms_per_prompt"]
    dev = device_name("cpu")
    out = write_result("proposer-index-cpu", figures, baseline, dev, extra={
        "workload": {"prompts": args.prompts, "length": args.length, "seed": args.seed,
                     "now": "one bulk append, request index to 8-grams",
                     "before": "token-by-token appends, 32-gram depth (the engine before ccc9504)"}})
    print_table(f"speculation index build on {dev}, {args.length}-token prompts",
                [("now", figures), ("before", baseline)],
                ["suffix_request_index_ms_per_prompt", "ngram_index_ms_per_prompt"])
    print(f"wrote {out}")
    return {"figures": figures, "baseline": baseline}


if __name__ == "__main__":
    main()
