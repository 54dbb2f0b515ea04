"""bench.trace_summary on a small trace written as `bench.spec --trace` writes one."""
from __future__ import annotations

import gzip
import json

from bench.trace_summary import main, paired_ratios, read_trace, step_kind, summarize_run


def _spec_step(run, ms, tokens, spec, drafted, decode=True, tainted=False, early=False, **host):
    return {"run": run, "ms": ms, "batch": 4, "running": 4, "spec": spec, "tokens": tokens, "rows": 4,
            "drafted": drafted, "overlapped": True, "decode": decode, "tainted": tainted, "early": early,
            "sync": 0.5, **{f"{k}_ms": v for k, v in host.items()}}


def _write(path, steps):
    with gzip.open(path, "wt") as f:
        for s in steps:
            f.write(json.dumps(s) + "\n")


def test_kinds_totals_and_paired_ratios(tmp_path, capsys):
    steps = []
    for rnd, off_ms in (("#0", 2.0), ("#1", 3.0)):
        steps += [{"run": f"chat b=4 off {rnd}", "ms": off_ms / 2, "rows": 4, "decode": True}] * 2
        steps += [_spec_step(f"chat b=4 ngram {rnd}", 1.0, 4, False, False),
                  _spec_step(f"chat b=4 ngram {rnd}", 3.0, 12, True, True, propose=0.5, build=0.25),
                  _spec_step(f"chat b=4 ngram {rnd}", 0.2, 4, False, False, early=True),
                  _spec_step(f"chat b=4 ngram {rnd}", 5.0, 4, True, False, decode=False, tainted=True)]
    path = tmp_path / "trace.jsonl.gz"
    _write(path, steps)
    runs = read_trace(str(path), ["chat b=4"])
    assert set(runs) == {"chat b=4 off #0", "chat b=4 off #1", "chat b=4 ngram #0", "chat b=4 ngram #1"}
    assert [step_kind(s) for s in runs["chat b=4 ngram #0"]] == ["P", "D", "P-early", "S-prefill-taint"]
    kinds = summarize_run(runs["chat b=4 ngram #0"])
    assert kinds["D"]["n"] == 1 and kinds["D"]["tok_per_ms"] == 4.0
    assert kinds["D"]["host"] == {"build": 0.25, "propose": 0.5}
    assert summarize_run(runs["chat b=4 off #0"])["off"]["ms"] == 2.0
    # off's summed time over ngram's (9.2 ms a round)
    assert paired_ratios(runs) == {("chat", "b=4", "ngram"): [2.0 / 9.2, 3.0 / 9.2]}
    assert read_trace(str(path), ["json"]) == {}
    main([str(path), "--runs", "chat b=4 ngram #0", "chat b=4 off #0"])
    out = capsys.readouterr().out
    assert "chat b=4 ngram #0: 4 steps, 9.2 ms" in out and "S-prefill-taint" in out and "(0.22)" in out
