"""Summarise a step trace (`bench.spec --trace FILE`, `SPEC_TRACE=1 bash bench/gpu_suite.sh f|ab`):
per run, its steps by kind, with their count, time, tokens per ms and the host timers per step;
per workload and batch size, each mode's summed step time and its ratio to speculation off's in
the same round (the trace's view of the paired speedup).

Kinds: D drafted, S speculating mode without drafts, P plain mode (speculation off's steps: off);
suffixes: -prefill (the step carried a prefill chunk), -taint (its period holds a prefill launch),
-early (finished by the next call's wait). A speculating engine's `ms` is the time the governor
and the controller learned from (index builds left out, `build_ms`).

    python -m bench.trace_summary trace-bf16.jsonl.gz --runs "chat b=32"
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import defaultdict


def read_trace(path: str, prefixes: list[str] | None = None) -> dict[str, list[dict]]:
    """Steps per run label, in order; only runs whose label starts with one of `prefixes`."""
    opener = gzip.open if path.endswith(".gz") else open
    runs: dict[str, list[dict]] = defaultdict(list)
    with opener(path, "rt") as f:
        for line in f:
            step = json.loads(line)
            if not prefixes or any(step["run"].startswith(p) for p in prefixes):
                runs[step["run"]].append(step)
    return dict(runs)


def step_kind(step: dict) -> str:
    if "spec" not in step:  # an engine without speculation
        return "off" if step["decode"] else "off-prefill"
    kind = "D" if step["drafted"] else ("S" if step["spec"] else "P")
    if not step["decode"]:
        kind += "-prefill"
    if step.get("tainted"):
        kind += "-taint"
    if step.get("early"):
        kind += "-early"
    return kind


def summarize_run(steps: list[dict]) -> dict[str, dict]:
    """Per kind: count, ms, ms per step, tokens per ms, and each host timer per step."""
    out: dict[str, dict] = {}
    for step in steps:
        k = out.setdefault(step_kind(step), {"n": 0, "ms": 0.0, "tokens": 0, "host": defaultdict(float)})
        k["n"] += 1
        k["ms"] += step["ms"]
        k["tokens"] += step.get("tokens", 0)
        for key, v in step.items():
            if key.endswith("_ms"):
                k["host"][key[:-3]] += v
    for k in out.values():
        k["per_step_ms"] = k["ms"] / k["n"]
        k["tok_per_ms"] = k["tokens"] / k["ms"] if k["ms"] > 0 else 0.0
        k["host"] = {h: v / k["n"] for h, v in sorted(k["host"].items())}
    return out


def paired_ratios(runs: dict[str, list[dict]]) -> dict[tuple[str, str, str], list[float]]:
    """(workload, batch, mode) -> speculation off's summed step time over the mode's, per round
    (labels "<workload> b=<batch> <mode> #<round>"), for the rounds where both ran."""
    total = {tuple(label.split()): sum(s["ms"] for s in steps) for label, steps in runs.items()}
    out: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for (w, b, mode, rnd), ms in sorted(total.items()):
        off = total.get((w, b, "off", rnd))
        if mode != "off" and off and ms > 0:
            out[(w, b, mode)].append(off / ms)
    return dict(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", help="a trace file (.jsonl or .jsonl.gz)")
    ap.add_argument("--runs", nargs="*", default=None, help="only runs whose label starts with these")
    args = ap.parse_args(argv)
    runs = read_trace(args.trace, args.runs)
    for label, steps in runs.items():
        print(f"{label}: {len(steps)} steps, {sum(s['ms'] for s in steps):.1f} ms")
        for kind, k in sorted(summarize_run(steps).items()):
            host = " ".join(f"{h}={v:.2f}" for h, v in k["host"].items())
            print(f"  {kind:18s} n={k['n']:4d} ms={k['ms']:8.1f} per={k['per_step_ms']:6.2f} "
                  f"tok/ms={k['tok_per_ms']:6.1f}  {host}")
    ratios = paired_ratios(runs)
    if ratios:
        print("\nspeculation off's time over each mode's, per round (median):")
        for (w, b, mode), r in ratios.items():
            print(f"  {w} {b} {mode}: {' '.join(f'{x:.2f}' for x in r)} ({statistics.median(r):.2f})")


if __name__ == "__main__":
    main()
