"""Host cost of the suffix proposer's job-wide index over a long job (CPU, no model).

A batch job's outputs stream into the job index (capped at `max_job_tokens`, 65,536 by default)
for thousands of requests. This streams synthetic structured outputs (a JSON-like template
with per-request values) through the proposer, reading the index after every output as the
engine's proposals do, and reports the host time per output and how many tokens per step the
job index alone would give when drafting each new output (k = 8). Baseline, in the same run:
the earlier eviction policy (one index, rebuilt from the outputs kept once past the cap).

    python -m bench.job_index
"""
from __future__ import annotations

import argparse
import random
import time
from collections import deque

from bench.common import device_name, print_table, write_result


def _outputs(n: int, seed: int) -> list[list[int]]:
    """Template tokens (field names, punctuation) around per-request values."""
    rng = random.Random(seed)
    fields = [[rng.randrange(100, 200) for _ in range(rng.randrange(2, 5))] for _ in range(8)]
    vocab = [rng.randrange(1000, 30000) for _ in range(3000)]
    out = []
    for _ in range(n):
        seq = [10, 11]
        for f in fields:
            seq += f + [12] + [rng.choice(vocab) for _ in range(rng.randrange(1, 8))] + [13]
        out.append(seq + [14])
    return out


class RebuildingJobIndex:
    """The eviction policy before generations: one index; past the cap, drop the oldest outputs
    down to 3/4 of it and re-index the kept ones (queued, `max_per_read` per read)."""
    max_per_read = 16

    def __init__(self, max_tokens: int, max_depth: int, max_occ: int) -> None:
        from engine.spec.suffix_index import SuffixIndex
        self.max_tokens, self.max_depth, self.max_occ = max_tokens, max_depth, max_occ
        self.seqs: deque[list[int]] = deque()
        self.size = 0
        self._index = SuffixIndex(max_depth, max_occ)
        self._queued: list[list[int]] = []
        self._rebuild = False

    def add(self, output: list[int]) -> None:
        output = list(output[-self.max_tokens:])
        self.seqs.append(output)
        self.size += len(output) + 1
        if self.size > self.max_tokens:
            while self.seqs and self.size > (3 * self.max_tokens) // 4:
                self.size -= len(self.seqs.popleft()) + 1
            self._rebuild, self._queued = True, []
        elif not self._rebuild:
            self._queued.append(output)

    @property
    def indexes(self) -> tuple:
        from engine.spec.suffix_index import SuffixIndex
        if self._rebuild:
            self._index = SuffixIndex(self.max_depth, self.max_occ)
            self._queued, self._rebuild = list(self.seqs), False
        for seq in self._queued[:self.max_per_read]:
            self._index.append_sequence(seq)
        del self._queued[:self.max_per_read]
        return (self._index,)


def stream(outputs: list[list[int]], job_index_cls, max_job_tokens: int, k: int) -> dict:
    """Finish the outputs one by one as one job; before each is added, draft it from the job
    index alone (as verification would: accepted drafts plus one token per step)."""
    import engine.spec.suffix as sx
    p = sx.SuffixProposer(max_job_tokens=max_job_tokens)
    real = sx._JobIndex
    sx._JobIndex = job_index_cls
    try:
        host = 0.0
        steps = tokens = 0
        for i, out in enumerate(outputs):
            pos = 0
            t0 = time.perf_counter()
            while pos < len(out):
                job = p._jobs.get("job")
                d = sx.match_generations(job.indexes, out[max(0, pos - 32):pos] or [10], min(k, len(out) - pos),
                                         p.min_prob, p.spec_factor).tokens if job else []
                a = 0
                while a < len(d) and d[a] == out[pos + a]:
                    a += 1
                pos, steps = pos + a + 1, steps + 1
            p.on_finished(f"r{i}", out, "job")
            host += time.perf_counter() - t0
            tokens += len(out)
    finally:
        sx._JobIndex = real
    return {"host_ms_per_output": host / len(outputs) * 1e3, "tokens_per_step": tokens / steps}


def main(argv=None) -> dict:
    from engine.spec.suffix import _JobIndex
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", type=int, default=3000)
    ap.add_argument("--max-job-tokens", type=int, default=65536)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    outputs = _outputs(args.outputs, args.seed)
    stream(outputs[:50], _JobIndex, args.max_job_tokens, args.k)  # warm up
    figures = stream(outputs, _JobIndex, args.max_job_tokens, args.k)
    baseline = stream(outputs, RebuildingJobIndex, args.max_job_tokens, args.k)
    figures["host_speedup"] = baseline["host_ms_per_output"] / figures["host_ms_per_output"]
    dev = device_name("cpu")
    tokens = sum(len(o) + 1 for o in outputs)
    path = write_result("job-index-cpu", figures, baseline, dev, extra={
        "workload": {"outputs": args.outputs, "output_tokens": tokens, "max_job_tokens": args.max_job_tokens,
                     "k": args.k, "seed": args.seed, "now": "two generations, the oldest dropped whole",
                     "before": "one index rebuilt from the kept outputs past the cap"}})
    print_table(f"job index over a {args.outputs}-output job ({tokens:,} tokens) on {dev}",
                [("generations", figures), ("rebuild", baseline)], ["host_ms_per_output", "tokens_per_step"])
    print(f"wrote {path}")
    return {"figures": figures, "baseline": baseline}


if __name__ == "__main__":
    main()
