"""How many tokens a proposer's drafts could give per step, on real outputs (CPU is enough).

The spec benchmark times whole runs, where the controller drafts only where it expects a gain.
This asks the proposer alone: given the greedy outputs of the real model (generated here, with
speculation off), if every step drafted k tokens from the history so far, how many tokens would
each step emit (accepted drafts plus one)? That is the ceiling on tokens per step, and so on
speedup once a drafting step's cost is known: at batch 1 on the H100 a drafting step costs
about 1.9 plain steps (8f44e4a: extraction, 390 drafting-mode steps in 0.94 s against 2,064 plain
steps in 2.59 s), so a workload needs about 3.8 tokens per step to reach 2x.

Requests run one after another as one job: the suffix proposer's job index holds every earlier
request's output, as it does late in a long job.

    python -m bench.proposer_ceiling --device cpu     # about 2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import random

from bench.common import device_name, print_table, write_result


def proposers() -> dict:
    from engine.spec import NgramProposer, SuffixProposer
    return {
        "ngram": lambda: NgramProposer(2, 4),  # the engine's default prompt_lookup_min / max
        "ngram-1-4": lambda: NgramProposer(1, 4),
        "suffix": SuffixProposer,
        "suffix-no-job": SuffixProposer,  # (run without job ids: the request's own index only)
    }


def ceiling(make, requests: list[tuple[list[int], list[int]]], k: int, job: str | None) -> dict:
    """Walk each output as verification would, drafting at every step: tokens per step and the
    share of drafted tokens accepted."""
    p = make()
    steps = tokens = drafted = accepted = 0
    for i, (prompt, out) in enumerate(requests):
        rid, pos = f"r{i}", 0
        while pos < len(out):
            d = p.propose([rid], [prompt + out[:pos]], [max(1, min(k, len(out) - pos - 1))], [job])[0]
            a = 0
            while a < len(d) and pos + a < len(out) and d[a] == out[pos + a]:
                a += 1
            drafted, accepted = drafted + len(d), accepted + a
            pos, steps = pos + a + 1, steps + 1
        p.on_finished(rid, out, job)
        tokens += len(out)
    return {"tokens_per_step": tokens / steps, "acceptance": accepted / max(1, drafted), "steps": steps,
            "tokens": tokens}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workloads", default="extract,rewrite,json,chat")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--draft-step-cost", type=float, default=1.9,
                    help="a drafting step's cost in plain steps (the speedup bound divides by it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from bench.spec import chat_tokens, make_engine, run_mode, workloads
    from engine.model_source import resolve_model
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    wl = workloads(max(256, args.requests), random.Random(args.seed))
    eng = make_engine(dict(model=path, tokenizer=tok, device=args.device, dtype="float32", seed=args.seed,
                           max_num_seqs=args.requests, max_model_len=2048, kv_cache_memory=1 << 30))
    figures, baseline, rows = {}, {}, []
    for name in args.workloads.split(","):
        prompts = [chat_tokens(tok, m) for m in wl[name][:args.requests]]
        _, outs = run_mode(eng, prompts, args.max_tokens)
        requests = list(zip(prompts, outs))
        baseline[f"{name}_tokens_per_step"] = 1.0  # speculation off: one token per step
        for label, make in proposers().items():
            job = None if label.endswith("no-job") else "job"
            c = ceiling(make, requests, args.k, job)
            bound = c["tokens_per_step"] / args.draft_step_cost
            figures[f"{name}_{label}_tokens_per_step"] = c["tokens_per_step"]
            figures[f"{name}_{label}_acceptance"] = c["acceptance"]
            figures[f"{name}_{label}_speedup_bound"] = bound
            rows.append((f"{name} {label}", {**c, "speedup_bound": bound}))
    dev = device_name(args.device)
    out = write_result(args.name or f"proposer-ceiling-{args.model}", figures, baseline, dev, extra={"workload": {
        "model": args.model, "requests": args.requests, "max_tokens": args.max_tokens, "k": args.k,
        "draft_step_cost": args.draft_step_cost,
        "method": "greedy outputs of the real model (speculation off), then each proposer drafts k at every "
                  "step of every output in turn; requests of a workload form one job"}})
    print_table(f"proposer ceiling, {args.model} greedy outputs ({args.requests} requests x {args.max_tokens} "
                f"tokens, k={args.k}; bound = tokens per step / {args.draft_step_cost})", rows,
                ["tokens_per_step", "acceptance", "speedup_bound"])
    print(f"wrote {out}")
    return figures


if __name__ == "__main__":
    main()
