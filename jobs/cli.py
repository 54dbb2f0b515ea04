"""Command line: `submit FILE ...` and `prefixq {submit,worker,status,results,cancel,ls}`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None, help="Redis URL (env PREFIXQ_REDIS_URL; default redis://127.0.0.1:6379/0)")
    p.add_argument("--store", default=None, help="store URL file:///path or s3://bucket/prefix (env PREFIXQ_STORE_URL or PREFIXQ_STORE; default file://./.prefixq/store)")
    p.add_argument("--queue", default=None, help="queue name (env PREFIXQ_QUEUE; default prefixq)")
    # read before parsing by main(); declared here so they may follow the subcommand
    p.add_argument("--config", default=argparse.SUPPRESS, help="config file (env PREFIXQ_CONFIG; default ~/.config/prefixq/config.toml)")
    p.add_argument("--log-format", choices=["text", "json"], default=argparse.SUPPRESS, help="log format (env PREFIXQ_LOG_FORMAT)")


def _client(a):
    from jobs.client import Client
    return Client(redis_url=a.redis_url, store_url=getattr(a, "store", None), queue=a.queue)


def _add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="job file: .jsonl / .parquet, or OpenAI Batch API .jsonl; or a store URL "
                                "(s3://bucket/key, file:///path), globs allowed: one job per object")
    p.add_argument("--model", default=None, help="model (default smollm2, or env PREFIXQ_MODEL)")
    p.add_argument("--max-tokens", type=int, default=None, help="default max_tokens for rows that set none (256)")
    p.add_argument("--temperature", type=float, default=None, help="default temperature for rows that set none (1.0)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--output-format", choices=["parquet", "jsonl"], default=None)
    p.add_argument("--job-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--wait", action="store_true", help="show a live progress bar until the job ends")
    p.add_argument("--split-rows", type=int, default=None,
                   help="split a job with more rows into shards for several workers (default: the worker's, 50000)")
    _common(p)


def cmd_submit(a) -> int:
    from jobs.formats import JobFileError
    from jobs import inputs
    c = _client(a)
    opts = dict(model=a.model, max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                output_format=a.output_format)
    try:
        if inputs.is_store_url(a.file):
            ids = inputs.submit_url(c, a.file, split_rows=getattr(a, "split_rows", None), **opts)
        else:
            ids = [inputs.submit_file(c, a.file, split_rows=getattr(a, "split_rows", None), job_id=a.job_id, **opts)]
    except JobFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(ids), flush=True)
    job_id = ids[-1]
    if a.wait and len(ids) > 1:
        return max(_print_end(c, c.wait(i, progress=True)) for i in ids)
    if a.wait:
        rec = c.wait(job_id, progress=True)
        return _print_end(c, rec)
    return 0


def _print_end(c, rec) -> int:
    if rec["status"] == "succeeded":
        print(f"{rec['id']} succeeded: {rec['done']} ok, {rec['failed']} failed", file=sys.stderr)
        print(f"results: {c.result_uri(rec['id'])}")
        return 0
    print(f"{rec['id']} {rec['status']}: {rec.get('error') or ''}", file=sys.stderr)
    return 1


def cmd_worker(a) -> int:
    from worker.main import run_worker
    return run_worker(model=a.model, queue=a.queue, engine=a.engine, burst=a.burst, metrics_port=a.metrics_port,
                      redis_url=a.redis_url, device=a.device, max_num_seqs=a.max_num_seqs,
                      shard_rows=a.shard_rows, shard_seconds=a.shard_seconds, split_rows=a.split_rows,
                      bridge=a.bridge, engine_config=_engine_config(a))


def _engine_config(a) -> dict:
    """Engine knobs named as vLLM names them; only those given are passed on."""
    cfg = {k: getattr(a, k) for k in ("dtype", "max_num_batched_tokens", "gpu_memory_utilization",
                                       "max_model_len", "speculative_method", "num_speculative_tokens",
                                       "prompt_lookup_min", "prompt_lookup_max", "speculative_model",
                                       "num_scheduler_steps")
           if getattr(a, k, None) is not None}
    if getattr(a, "no_prefix_caching", False):
        cfg["enable_prefix_caching"] = False
    if getattr(a, "speculative_draft_ahead", False):
        cfg["speculative_draft_ahead"] = True
    c = getattr(a, "cascade_attention", None)
    if c is not None:
        cfg["cascade_attention"] = {"auto": "auto", "on": True, "off": False}[c]
    return cfg


def _fmt_age(ts) -> str:
    if not ts:
        return "-"
    s = time.time() - float(ts)
    return f"{s:.0f}s" if s < 120 else (f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h")


def cmd_status(a) -> int:
    c = _client(a)
    try:
        rec = c.status(a.job_id)
    except (KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.watch and rec["status"] not in ("succeeded", "failed", "cancelled", "dead"):
        rec = c.wait(a.job_id, progress=True)
    if a.json:
        print(json.dumps(rec, indent=2, default=str))
        return 0
    for k in ("id", "status", "model", "total", "done", "failed", "attempts", "worker", "rows_per_s",
              "created_at", "started_at", "finished_at", "paused", "error", "results_key"):
        v = rec.get(k)
        if k.endswith("_at") and v:
            v = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(v)))
        print(f"{k:12} {'' if v is None else v}")
    for reason in rec.get("attempt_reasons", []):
        print(f"attempt {reason.get('attempt', '-')} [{reason.get('kind', 'error')}] "
              f"{reason.get('worker') or ''}: {reason.get('error') or ''}")
    return 0


def cmd_results(a) -> int:
    c = _client(a)
    if a.presign:
        from storage.base import StoreError
        try:
            for url in c.presign(a.job_id, a.expires):
                print(url)
        except (KeyError, ValueError, RuntimeError, StoreError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        path = c.results(a.job_id, a.output)
    except (KeyError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.print:
        print_table(path)
    else:
        print(path)
    return 0


def _read_results(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def print_table(path: str, width: int = 70) -> None:
    rows = _read_results(path)
    print(f"results: {path}")
    print(f"{'custom_id':18} {'finish':7} {'tok':>4} {'ms':>7}  text")
    for r in rows:
        if "response" in r:  # OpenAI output line
            body = (r.get("response") or {}).get("body") or {}
            ch = (body.get("choices") or [{}])[0]
            text = (ch.get("message") or {}).get("content", ch.get("text", "")) or ""
            r = {"custom_id": r["custom_id"], "finish_reason": ch.get("finish_reason"),
                 "completion_tokens": (body.get("usage") or {}).get("completion_tokens", 0), "latency_ms": 0}
            r["text"] = text
        text = r.get("text") or ("ERROR: " + (r.get("error") or ""))
        text = " ".join(text.split())
        if len(text) > width:
            text = text[: width - 1] + "…"
        print(f"{str(r['custom_id'])[:18]:18} {str(r.get('finish_reason')):7} {r.get('completion_tokens') or 0:>4} "
              f"{r.get('latency_ms') or 0:>7.0f}  {text}")


def cmd_cancel(a) -> int:
    c = _client(a)
    try:
        ok = c.cancel(a.job_id)
    except (KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{a.job_id}: {'cancelling' if ok else 'already finished'}")
    return 0 if ok else 1


def cmd_ls(a) -> int:
    c = _client(a)
    print(f"{'ID':26} {'STATUS':10} {'PROGRESS':>14} {'ROWS/S':>8} {'AGE':>6}")
    for rec in c.list(a.limit):
        prog = f"{rec.get('done', 0) + rec.get('failed', 0)}/{rec.get('total', 0)}"
        print(f"{rec['id']:26} {rec['status']:10} {prog:>14} {rec.get('rows_per_s') or 0:>8.2f} {_fmt_age(rec.get('created_at')):>6}")
    return 0


def cmd_bench(a) -> int:
    import importlib
    importlib.import_module(f"bench.{a.which}").main(a.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prefixq", description="Batch LLM inference over Redis and S3-compatible storage")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("submit", help="validate, upload and enqueue a job file; prints the job id")
    _add_submit_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("worker", help="run a worker: load the model once, take jobs one after another")
    p.add_argument("--model", default=None)
    p.add_argument("--engine", choices=["paged", "hf", "auto"], default=os.environ.get("PREFIXQ_ENGINE", "auto"),
                   help="paged (default when available) or hf (transformers generate baseline)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("PREFIXQ_METRICS_PORT", "9090")),
                   help="Prometheus port (0 disables)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--max-num-seqs", type=int,
                   default=int(os.environ["PREFIXQ_MAX_NUM_SEQS"]) if os.environ.get("PREFIXQ_MAX_NUM_SEQS") else None,
                   help="requests running at once (default 256 on a GPU, 32 on the CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step (8192)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="fraction of GPU memory (0.9)")
    p.add_argument("--dtype", default=None, help="auto, bfloat16, float16, float32")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    p.add_argument("--cascade-attention", choices=["auto", "on", "off"], default=None,
                   help="shared-prefix decode attention (auto: on the GPU for KV rows >= 512 wide)")
    p.add_argument("--num-scheduler-steps", type=int, default=None,
                   help="decode steps per host step when a step only decodes (1: off, the default)")
    p.add_argument("--speculative-method", choices=["ngram", "suffix"], default=None)
    p.add_argument("--num-speculative-tokens", type=int, default=None, help="k, the most drafts per step")
    p.add_argument("--prompt-lookup-min", type=int, default=None, help="n-gram: shortest match (2)")
    p.add_argument("--prompt-lookup-max", type=int, default=None, help="n-gram: longest match (4)")
    p.add_argument("--speculative-model", default=None, help="a smaller model with the same tokenizer")
    p.add_argument("--speculative-draft-ahead", action="store_true",
                   help="n-gram/suffix: draft past the token in flight instead of waiting for it")
    p.add_argument("--shard-rows", type=int, default=256, help="commit a result shard every N rows")
    p.add_argument("--shard-seconds", type=float, default=10.0, help="... or every M seconds")
    p.add_argument("--split-rows", type=int, default=int(os.environ.get("PREFIXQ_SPLIT_ROWS", "50000")),
                   help="split jobs with more rows into shard jobs for several workers (0: never)")
    p.add_argument("--no-bridge", dest="bridge", action="store_false",
                   help="do not serve the plain-Redis submit stream (docs/redis-contract.md)")
    _common(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("status", help="show a job's state")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true", help="live progress bar until the job ends")
    _common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("results", help="download a job's results")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", default=None, help="output file (default ./<id>-results.<ext>)")
    p.add_argument("--print", action="store_true", help="also print the results as a table")
    p.add_argument("--presign", action="store_true",
                   help="print presigned GET URLs for the results (S3 stores) instead of downloading")
    p.add_argument("--expires", type=int, default=3600, help="presigned URL lifetime in seconds (default 3600)")
    _common(p)
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job_id")
    _common(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("bench", help="benchmarks: throughput, prefix, spec, proposer_ceiling (each takes --help)",
                       add_help=False)
    p.add_argument("which", choices=["throughput", "prefix", "spec", "proposer_ceiling"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("ls", help="list recent jobs")
    p.add_argument("--limit", type=int, default=20)
    _common(p)
    p.set_defaults(func=cmd_ls)

    from jobs import cli_ops
    cli_ops.add_parsers(sub, _common)
    from jobs import cli_reliability
    cli_reliability.add_parsers(sub, _common)
    return ap


def _logging(argv) -> None:
    """Config file into the environment (flags > env > file), then log setup; before the parser,
    whose defaults read the environment."""
    from jobs import config
    from worker import logging_setup
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--log-format", choices=["text", "json"], default=None)
    known, _ = pre.parse_known_args(argv)
    try:
        config.apply_to_environ(known.config)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    logging_setup.setup(known.log_format)
    from jobs import redact
    redact.install()  # credentials never reach the logs, whatever a library logs at DEBUG


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _logging(argv)
    a = build_parser().parse_args(argv)
    return a.func(a)


def submit_main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _logging(argv)
    ap = argparse.ArgumentParser(prog="submit", description="Validate, upload and enqueue a prefixq job file")
    _add_submit_args(ap)
    return cmd_submit(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
