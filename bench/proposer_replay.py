"""The proposer's host time on real calls, this tree against another revision's (CPU).

On the H200 in bf16 a SmolLM2 step at batch 32 is about 1.1 ms, and the suffix proposer's calls
took 1.7 ms per drafting step (twelfth session, `docs/benchmarks.md`): its host time decides
whether it pays there. This records every call an engine makes into its proposer (the
histories, the tokens asked, the jobs, the finished outputs, in order) during a real run, then
replays the recording into a fresh proposer of this tree and of `--baseline-rev` (unpacked with
`git archive`, run in a subprocess), timing the calls, checking whether both propose the same
drafts as the recorded run (`--require-same-drafts` fails otherwise: for changes meant to be
exact), and counting the drafted tokens each request's real continuation holds (for changes to
what is drafted).

    python -m bench.proposer_replay --record /tmp/json-b32.pkl      # SmolLM2 on the CPU, minutes
    python -m bench.proposer_replay --replay /tmp/json-b32.pkl --baseline-rev c165560

The recording runs with async output (the GPU's flow: a lookahead before waiting for the step
in flight, then the proposal) and drafting on every step (`adaptive_speculation=False`), so each
step is a drafting step's two calls.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace


def record(path: str, workload: str, batch: int, requests: int, method: str, max_tokens: int,
           adaptive: bool = False) -> None:
    import random

    from bench.spec import chat_tokens, make_engine, run_mode, workloads
    from engine.model_source import resolve_model
    from transformers import AutoTokenizer
    model = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(model)
    eng = make_engine(dict(model=model, tokenizer=tok, device="cpu", dtype="float32", seed=0, max_num_seqs=batch,
                           max_model_len=2048, speculative_method=method, async_scheduling=True,
                           adaptive_speculation=adaptive))
    prop = eng.spec.proposer
    events: list[tuple] = []
    real_propose, real_finished = prop.propose, prop.on_finished

    def propose(ids, hists, ks, jobs=None):
        out = real_propose(ids, hists, ks, jobs)
        events.append(("propose", list(ids), [list(h) for h in hists], list(ks), list(jobs or []), out))
        return out

    def on_finished(rid, tokens, job=None):
        events.append(("finished", rid, list(tokens), job))
        return real_finished(rid, tokens, job)
    prop.propose, prop.on_finished = propose, on_finished
    prompts = [chat_tokens(tok, m) for m in workloads(requests, random.Random(0))[workload][:requests]]
    fig, _ = run_mode(eng, prompts, max_tokens, batch)
    with open(path, "wb") as f:
        pickle.dump({"method": method, "workload": workload, "batch": batch, "requests": requests, "adaptive": adaptive,
                     "max_tokens": max_tokens, "prompt_lookup": (eng.config.prompt_lookup_min,
                                                                 eng.config.prompt_lookup_max),
                     "events": events}, f)
    calls = sum(1 for e in events if e[0] == "propose")
    print(f"recorded {calls} calls, {len(events) - calls} finished outputs, acceptance {fig['acceptance']:.2f} -> {path}")


def continuations(rec: dict) -> dict[str, list[int]]:
    """Each request's whole sequence (prompt and output) as the recorded run produced it: its
    longest history seen, with its finished output laid over the output tokens it ends with."""
    full: dict[str, list[int]] = {}
    for ev in rec["events"]:
        if ev[0] == "propose":
            for rid, h in zip(ev[1], ev[2]):
                if len(h) > len(full.get(rid, ())):
                    full[rid] = h
    for ev in rec["events"]:
        if ev[0] == "finished":
            rid, out = ev[1], ev[2]
            h = full.get(rid, [])
            m = next(m for m in range(min(len(out), len(h)), -1, -1) if h[len(h) - m:] == out[:m])
            full[rid] = h[:len(h) - m] + list(out)
    return full


def replay(path: str, repeats: int) -> dict:
    """This process's `engine` proposer on the recording: seconds per call (the fastest of
    `repeats` replays), whether every call proposed what the recorded run did, and how many
    drafted tokens the request's real continuation has at their place (`matched_tokens`, of
    `proposed_tokens`): what a change to what the proposer drafts gains or loses."""
    import gc

    from engine.spec_decode import make_proposer
    with open(path, "rb") as f:
        rec = pickle.load(f)
    truth = continuations(rec)
    best, same, matched, proposed = None, True, 0, 0
    for rep in range(repeats):
        lo, hi = rec["prompt_lookup"]  # (what make_proposer reads of an engine's config)
        cfg = SimpleNamespace(speculative_method=rec["method"], prompt_lookup_min=lo, prompt_lookup_max=hi)
        prop = make_proposer(SimpleNamespace(config=cfg))
        gc.collect()
        total, calls, requests = 0.0, 0, 0
        for ev in rec["events"]:
            if ev[0] == "finished":
                prop.on_finished(ev[1], ev[2], ev[3])
                continue
            _, ids, hists, ks, jobs, out = ev
            t0 = time.perf_counter()
            got = prop.propose(ids, hists, ks, jobs or None)
            total += time.perf_counter() - t0
            calls += 1
            requests += len(ids)
            same = same and got == out
            if rep == 0:
                for rid, h, d in zip(ids, hists, got):
                    real = truth[rid][len(h):len(h) + len(d)]
                    n = next((j for j, (a, b) in enumerate(zip(d, real)) if a != b), min(len(d), len(real)))
                    matched, proposed = matched + n, proposed + len(d)
        if best is None or total < best:
            best = total
    return {"ms_per_call": best * 1e3 / calls, "us_per_request": best * 1e6 / requests, "calls": calls,
            "same_drafts": int(same), "matched_tokens": matched, "proposed_tokens": proposed}


def _run_tree(tree: str, path: str, repeats: int) -> dict:
    code = ("import sys, json, importlib.util as u; sys.path[:0] = [sys.argv[1]]; "
            "s = u.spec_from_file_location('proposer_replay', sys.argv[2]); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); print(json.dumps(m.replay(sys.argv[3], int(sys.argv[4]))))")
    out = subprocess.check_output([sys.executable, "-c", code, tree, os.path.abspath(__file__), path, str(repeats)],
                                  cwd=tree, text=True, env={**os.environ, "PYTHONPATH": tree})
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", help="run SmolLM2 on the CPU and write the proposer's calls here")
    ap.add_argument("--replay", help="a recording to replay")
    ap.add_argument("--baseline-rev", default="c165560")
    ap.add_argument("--workload", default="json")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--method", default="suffix")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default=None, help="results file name (default: from the recording)")
    ap.add_argument("--require-same-drafts", action="store_true",
                    help="fail unless both trees propose the recorded drafts (a change meant to be exact)")
    ap.add_argument("--adaptive", action="store_true",
                    help="record with the controller on (probes and lookaheads as it plans them on the CPU)")
    args = ap.parse_args(argv)
    if args.record:
        record(args.record, args.workload, args.batch, args.requests, args.method, args.max_tokens, args.adaptive)
        return None
    if not args.replay:
        raise SystemExit("--record PATH or --replay PATH")
    from bench.common import device_name, print_table, write_result
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = tempfile.mkdtemp(prefix=f"prefixq-{args.baseline_rev}-")
    archive = subprocess.run(["git", "archive", args.baseline_rev, "engine", "kernels"], cwd=here,
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
    path = os.path.abspath(args.replay)
    with open(path, "rb") as f:
        rec = pickle.load(f)
    this, then = _run_tree(here, path, args.repeats), _run_tree(base, path, args.repeats)
    figures = {**this, "speedup": then["ms_per_call"] / this["ms_per_call"]}
    tag = f"{rec['method']}-{rec['workload']}-b{rec['batch']}" + ("-adaptive" if rec.get("adaptive") else "")
    out = write_result(args.name or f"proposer-replay-{tag}-cpu", figures, then, device_name("cpu"), extra={"workload": {
        k: rec[k] for k in ("method", "workload", "batch", "requests", "max_tokens")} | {
        "recording": "SmolLM2 fp32 on the CPU, async output, "
                     + ("the controller on" if rec.get("adaptive") else "drafting every step (adaptive off)"),
        "baseline": f"proposer at {args.baseline_rev}", "repeats": args.repeats}})
    print_table(f"proposer replay, {tag}, CPU", [("this tree", this), (args.baseline_rev, then)],
                ["ms_per_call", "us_per_request", "calls", "same_drafts", "matched_tokens", "proposed_tokens"])
    print(f"wrote {out}")
    if args.require_same_drafts and not (this["same_drafts"] and then["same_drafts"]):
        raise SystemExit("a replay proposed different drafts from the recorded run")
    return figures


if __name__ == "__main__":
    main()
