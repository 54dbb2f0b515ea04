"""Speculative decoding: speculation off against each method, at several batch sizes,
on copy-heavy tasks (extract, rewrite, fill JSON) and on open chat, with the real
SmolLM2. Greedy outputs must be identical across modes; the benchmark checks it.

    python -m bench.spec --model smollm2                    # GPU, the full table
    python -m bench.spec --model smollm2 --device cpu --batch-sizes 1,4 --max-tokens 32 --docs 4
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time

import torch

from bench.common import device_name, print_table, write_result

FIRST = ["Alice", "Bruno", "Chen", "Dara", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam"]
LAST = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Silva", "Novak", "Haddad", "Brennan", "Kowalski", "Reyes"]
CITY = ["Lisbon", "Osaka", "Nairobi", "Toronto", "Krakow", "Valparaiso", "Tallinn", "Pune"]
CHAT_ANGLES = ["for a curious child.", "for a busy engineer.", "in plain words.", "with one example.",
               "as a short story.", "with a surprising fact.", "for a beginner.", "step by step."]
ITEM = ["solar inverters", "hospital beds", "laboratory reagents", "bicycle frames", "server racks", "seed stock"]


def make_document(rng: random.Random) -> dict:
    who = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    other = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    city, item = rng.choice(CITY), rng.choice(ITEM)
    qty, price = rng.randint(12, 900), rng.randint(40, 9000)
    date = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    text = (f"On {date}, {who}, purchasing lead at the {city} office, signed an order for {qty} units of {item} "
            f"at {price} euros per unit. The supplier's account manager, {other}, confirmed delivery to the "
            f"{city} warehouse within six weeks. {who} noted that the previous shipment of {item} arrived two "
            f"days late, and asked {other} to confirm the new delivery date in writing. The total value of the "
            f"order is {qty * price} euros, payable in two instalments.")
    return {"text": text, "who": who, "other": other, "date": date, "city": city, "item": item}


def workloads(n: int, rng: random.Random) -> dict[str, list[list[dict]]]:
    docs = [make_document(rng) for _ in range(n)]
    chat_topics = ["why the sky is blue", "how to start learning the guitar", "a short story about a lighthouse",
                   "the pros and cons of remote work", "how bread rises", "tips for a first marathon"]
    user = lambda c: [{"role": "user", "content": c}]  # noqa: E731
    return {
        "extract": [user(f"Document:\n{d['text']}\n\nList every person, date, place and amount in the document, "
                         f"one per line, copying them exactly.") for d in docs],
        "rewrite": [user(f"Rewrite this passage in the same words but as a numbered list of its sentences:\n\n"
                         f"{d['text']}") for d in docs],
        "json": [user(f"Fill this JSON from the document and output only the JSON.\n"
                      f'{{"buyer": "", "supplier_contact": "", "date": "", "city": "", "item": "", '
                      f'"quantity": 0, "unit_price_eur": 0, "total_eur": 0}}\n\nDocument:\n{d["text"]}')
                 for d in docs],
        # Every chat prompt is distinct: a run is one job, and the suffix proposer's job-wide index
        # would otherwise copy a repeated prompt's greedy answer whole.
        "chat": [user(f"Tell me about {chat_topics[i % len(chat_topics)]}, {CHAT_ANGLES[i // len(chat_topics) % 8]}"
                      + (f" Use at most {60 + i} words." if i >= 8 * len(chat_topics) else ""))
                 for i in range(n)],
    }


def chat_tokens(tok, messages: list[dict]) -> list[int]:
    """A workload's chat messages as the model's prompt token ids (its chat template)."""
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)


_run_id = 0


def make_engine(kw: dict):
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    eng = LLMEngine(**kw)
    for i in range(4):  # warm-up: kernels compile here, not in the timings
        eng.add_request(f"warm{i}", [100 + i] * (20 + 30 * i), SamplingParams(max_tokens=8, temperature=0,
                                                                              detokenize=False))
    while eng.has_unfinished():
        eng.step()
    return eng


def run_mode(eng, prompts: list[list[int]], max_tokens: int, batch: int | None = None
             ) -> tuple[dict, list[list[int]]]:
    """One timed run on a warm engine, every prompt queued at once, with at most `batch`
    requests running (all by default): the engine runs as one built with max_num_seqs =
    `batch` does, admitting as requests finish (on the GPU, a slot's worth at a time: an
    eighth of max_num_seqs, so that prefills share steps). (Until 2026-11-28 runs went in
    rounds of `batch` that all had to finish before the next began: a tail of a few slow
    requests every round, a cost a job does not pay, and one that speculation, which makes
    requests finish unevenly, paid most.) Request ids are fresh so per-request state starts
    clean. The run is one job, as a worker would run it (the suffix proposer learns from the
    job's finished outputs); each run gets a fresh job id, so a repeated run cannot copy its
    own outputs."""
    from engine.sampling_params import SamplingParams
    global _run_id
    _run_id += 1
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, detokenize=False)
    base = dict(eng.counters)
    cfg, sched = eng.config, eng.scheduler
    saved = cfg.max_num_seqs, sched.min_admission_slots
    if batch:
        cfg.max_num_seqs = batch
        if saved[1] > 1:
            sched.min_admission_slots = max(1, batch // 8)
    outs = {}
    t0 = time.monotonic()
    try:
        for i, p in enumerate(prompts):
            eng.add_request(f"{_run_id}-{i}", p, sp, job_id=f"run-{_run_id}")
        while eng.has_unfinished():
            outs.update({o.request_id: o.token_ids for o in eng.step()})
    finally:
        cfg.max_num_seqs, sched.min_admission_slots = saved
    elapsed = time.monotonic() - t0
    c = {k: eng.counters[k] - base[k] for k in base}
    fig = {"tok_s": c["generated_tokens"] / elapsed, "elapsed_s": elapsed,
           "acceptance": c["spec_accepted"] / c["spec_proposed"] if c["spec_proposed"] else 0.0,
           "proposed": c["spec_proposed"],
           # how the governor and the lookahead spent the steps
           "steps": c["steps"], "spec_mode_steps": c["spec_mode_steps"], "wait_steps": c["spec_wait_steps"],
           "verifications": c["spec_verifications"],
           "mean_accepted_length": c["spec_accepted"] / c["spec_verifications"] if c["spec_verifications"] else 0.0}
    return fig, [outs[f"{_run_id}-{i}"] for i in range(len(prompts))]


def _spread(rates: list[float]) -> float:
    """How far apart one mode's runs were (1 - slowest / fastest): the noise a speedup near
    1.0 has to be read against."""
    return 1 - min(rates) / max(rates)


def _paired(rates: list[float], off_rates: list[float]) -> float:
    """Median over rounds of a mode's rate over speculation off's in the same round. The lent
    H200's host ran up to 1.7x slower for seconds at a time (every host function alike), which
    a host-bound run (bf16, batch 256: about 0.25 s) cannot average out; the runs of one round
    are a second apart, so a slow phase mostly covers both."""
    return statistics.median(r / o for r, o in zip(rates, off_rates))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", help="float32 keeps greedy outputs comparable across modes")
    ap.add_argument("--greedy-check", choices=["strict", "report"], default="strict",
                    help="strict: fail if greedy outputs differ across modes; report: only count them (bf16, "
                         "where a verification step's rounding differs from a plain step's and near ties flip)")
    ap.add_argument("--batch-sizes", default="1,8,32,256")
    ap.add_argument("--methods", default="ngram,suffix",
                    help="ngram, suffix; '-ahead' (ngram-ahead) drafts past the step in flight")
    ap.add_argument("--workloads", default="extract,rewrite,json,chat")
    ap.add_argument("--k", type=int, default=8, help="most drafts per step (the engine's default for n-gram and suffix)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--min-rounds", type=int, default=4,
                    help="batch sizes up to 32 run at least this many times b requests (32 requests last 0.1-0.3 s, "
                         "too short for one timing)")
    ap.add_argument("--min-requests", type=int, default=16,
                    help="small batch sizes run b concurrent requests until this many ran "
                         "(one 128-token request alone is too short to time)")
    ap.add_argument("--draft-pair", default="smollm2-135m",
                    help="random-weight target/draft pair of this shape for the draft-model overhead row ('' skips)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per mode, alternating; the fastest counts")
    ap.add_argument("--repeats-large", type=int, default=5,
                    help="runs per mode at batch sizes of 128 and more, at least (a bf16 run at batch 256 takes "
                         "about 0.25 s on the H200, and single runs swung by a third)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-blocks", type=int, default=8192, help="KV pool per engine (several engines share the GPU)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--trace", default=None, help="write every step of every run here, one JSON line each")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import AutoTokenizer

    from engine.model_source import resolve_model
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    rng = random.Random(args.seed)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    n_requests = {b: max(b, args.min_requests, b * args.min_rounds if b <= 32 else b) for b in batch_sizes}
    wl = workloads(max(args.docs, *n_requests.values()), rng)
    base_kw = dict(model=path, tokenizer=tok, device=args.device, dtype=args.dtype, seed=args.seed,
                   max_num_seqs=max(batch_sizes), max_model_len=2048, num_gpu_blocks_override=args.kv_blocks,
                   kv_cache_memory=1 << 30)
    methods = args.methods.split(",")
    engines = {"off": make_engine(base_kw)}
    for m in methods:
        # "<method>-ahead": the same proposer drafting past the step in flight (no wait after
        # plain steps), to compare both drafting modes in one run on one card.
        base, _, variant = m.partition("-")
        extra = {"speculative_draft_ahead": True} if variant == "ahead" else {}
        if variant not in ("", "ahead") or base not in ("ngram", "suffix"):
            raise SystemExit(f"unknown method {m!r}: use ngram, suffix, or either with -ahead")
        engines[m] = make_engine(dict(base_kw, speculative_method=base, num_speculative_tokens=args.k, **extra))
    figures, baseline, rows, mismatches = {}, {}, [], []
    traces, trace_file = {}, None
    if args.trace:
        from bench.step_trace import StepTrace
        traces = {m: StepTrace(e) for m, e in engines.items()}
        trace_file = open(args.trace, "w")
    for name in args.workloads.split(","):
        for b in batch_sizes:
            prompts = [chat_tokens(tok, m) for m in wl[name][:n_requests[b]]]
            # Modes alternate, `--repeats` times; each keeps its fastest run (runs of about a
            # second vary by several percent from one to the next).
            best: dict[str, dict] = {}
            rates: dict[str, list[float]] = {}
            ref = None
            for rep in range(max(args.repeats, args.repeats_large) if b >= 128 else args.repeats):
                for mode in ["off"] + methods:
                    fig, outs = run_mode(engines[mode], prompts, args.max_tokens, b)
                    if trace_file is not None:
                        for i, st in enumerate(traces[mode].take()):
                            trace_file.write(json.dumps({"run": f"{name} b={b} {mode} #{rep}", "step": i, **st}) + "\n")
                    if ref is None:
                        ref = outs
                    same = sum(o == r for o, r in zip(outs, ref))
                    if same != len(ref):
                        mismatches.append(f"{name} b={b} {mode}: {len(ref) - same} of {len(ref)} differ")
                    rates.setdefault(mode, []).append(fig["tok_s"])
                    if mode not in best or fig["tok_s"] > best[mode]["tok_s"]:
                        best[mode] = fig
            off = best["off"]
            baseline[f"{name}_b{b}_tok_s"] = off["tok_s"]
            baseline[f"{name}_b{b}_run_spread"] = _spread(rates["off"])
            rows.append((f"{name} b={b} off", off))
            for method in methods:
                fig = best[method]
                fig["speedup"] = fig["tok_s"] / off["tok_s"]
                fig["paired"] = _paired(rates[method], rates["off"])
                for k in ("tok_s", "acceptance", "speedup", "mean_accepted_length", "steps", "spec_mode_steps",
                          "wait_steps"):
                    figures[f"{name}_b{b}_{method}_{k}"] = fig[k]
                figures[f"{name}_b{b}_{method}_run_spread"] = _spread(rates[method])
                figures[f"{name}_b{b}_{method}_speedup_paired"] = fig["paired"]
                rows.append((f"{name} b={b} {method}", fig))
    if trace_file is not None:
        trace_file.close()
    del engines, traces
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if args.draft_pair:
        # Draft path overhead: a random-weight target and draft of the same shape (acceptance
        # is meaningless here; the row shows what drafting and verifying cost).
        from engine.models.shapes import dummy_model_dir
        tgt, dft = dummy_model_dir(args.draft_pair), dummy_model_dir(args.draft_pair)
        prompts = [chat_tokens(tok, m) for m in wl["extract"][:8]]
        kw = dict(base_kw, model=tgt, load_format="dummy", max_num_seqs=8)

        def timed(engine_kw: dict) -> dict:
            eng = make_engine(engine_kw)
            fig, _ = run_mode(eng, prompts, args.max_tokens)
            del eng  # each engine's KV pool and graphs go before the next one is built
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return fig
        off = timed(kw)
        fig = timed(dict(kw, speculative_model=dft, num_speculative_tokens=args.k, adaptive_speculation=False))
        # The same pair with adaptive speculation (the default): nothing is ever accepted, so
        # the controller and governor should fall back to plain decoding.
        ada = timed(dict(kw, speculative_model=dft, num_speculative_tokens=args.k))
        baseline["draft_random_pair_b8_tok_s"] = off["tok_s"]
        figures["draft_random_pair_b8_tok_s"] = fig["tok_s"]
        figures["draft_random_pair_b8_speedup"] = fig["tok_s"] / off["tok_s"]
        figures["draft_random_pair_b8_adaptive_speedup"] = ada["tok_s"] / off["tok_s"]
        rows.append(("draft (random pair) b=8 off", off))
        rows.append(("draft (random pair) b=8 k=%d" % args.k, dict(fig, speedup=fig["tok_s"] / off["tok_s"])))
        rows.append(("draft (random pair) b=8 adaptive", dict(ada, speedup=ada["tok_s"] / off["tok_s"])))
    figures["greedy_mismatched_runs"] = len(mismatches)
    dev = device_name(args.device)
    name = args.name or f"spec-{args.model}-{'gpu' if args.device != 'cpu' else 'cpu'}"
    out = write_result(name, figures, baseline, dev, extra={"workload": {
        "model": args.model, "dtype": args.dtype, "k": args.k, "max_tokens": args.max_tokens,
        "repeats": args.repeats, "repeats_large": args.repeats_large,
        "timing": "modes alternate; each figure is the mode's fastest run; speedup_paired: median "
                  "over rounds of the ratio within a round",
        "batch_sizes": batch_sizes, "methods": methods,
        "drafting": "wait for the step in flight before drafting; '-ahead' methods draft past it",
        "draft_pair": "random weights, same shapes: shows overhead only", "mismatches": mismatches,
        "greedy_check": args.greedy_check}})
    print_table(f"{name} on {dev} (greedy, k={args.k}, {args.max_tokens} tokens)", rows,
                ["tok_s", "speedup", "paired", "acceptance", "elapsed_s", "steps", "spec_mode_steps", "wait_steps"])
    print(f"wrote {out}")
    if mismatches and args.greedy_check == "strict":
        raise SystemExit("greedy outputs differ across modes: " + "; ".join(mismatches))
    if mismatches:
        print("greedy outputs differ across modes (reported, not checked): " + "; ".join(mismatches))
    return figures


if __name__ == "__main__":
    main()
