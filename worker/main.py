"""`prefixq worker`: load the model once, then take jobs one after another, in-process.

rq 3.x with the JSON serializer only, and rq's SimpleWorker (no fork: CUDA does
not survive fork, and the model would reload per job).
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("prefixq.worker")


def run_worker(model: str | None = None, queue: str | None = None, engine: str | None = None,
               burst: bool = False, metrics_port: int = 9090, redis_url: str | None = None,
               device: str | None = None, max_num_seqs: int | None = None, max_inflight: int | None = None,
               window: int | None = None, shard_rows: int = 256, shard_seconds: float = 10.0,
               split_rows: int = 0, bridge: bool = False, engine_config: dict | None = None) -> int:
    import redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    from jobs import state
    from worker import runner
    from worker.engine_factory import make_engine
    from worker.metrics import Metrics

    redis_url = redis_url or state.redis_url()
    from jobs import redact
    redact.add_secret_urls(redis_url)
    redact.install()
    model = model or os.environ.get("PREFIXQ_MODEL", "smollm2")
    queue = queue or os.environ.get("PREFIXQ_QUEUE", state.DEFAULT_QUEUE)
    r_text = state.connect(redis_url)
    r_bytes = state.connect(redis_url, decode=False)  # reconnects with backoff (Redis restarts)

    metrics = Metrics(redis_conn=r_text)
    if metrics_port:
        metrics.serve(metrics_port)
        log.info("metrics on :%d/metrics", metrics_port)

    t0 = time.monotonic()
    if max_num_seqs is None:  # a GPU batches hundreds of sequences; the CPU path gains little past a few dozen
        import torch
        on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        max_num_seqs = 256 if on_gpu else 32
    eng, kind = make_engine(engine, model, device=device, max_num_seqs=max_num_seqs, **(engine_config or {}))
    load_s = time.monotonic() - t0
    metrics.model_load_seconds.set(load_s)
    log.info("loaded %s with engine %s in %.1fs", model, kind, load_s)

    # Rows are tokenized and ordered by prefix a window at a time: bounded memory on huge jobs,
    # and the larger the window, the more of a job's shared prefixes land together.
    window = window or int(os.environ.get("PREFIXQ_ORDER_WINDOW", "50000"))
    ctx = runner.WorkerContext(engine=eng, engine_kind=kind, model=model, redis=r_text, metrics=metrics,
                               window=window, max_inflight=max_inflight or max(8, 2 * max_num_seqs),
                               shard_rows=shard_rows, shard_seconds=shard_seconds, redis_bytes=r_bytes,
                               drain_seconds=float(os.environ.get("PREFIXQ_DRAIN_SECONDS", "30")),
                               heartbeat_ttl=float(os.environ.get("PREFIXQ_HEARTBEAT_TTL_S", "30")),
                               heartbeat_seconds=float(os.environ.get("PREFIXQ_HEARTBEAT_S", "5")))
    ctx.split_rows = split_rows
    # Also take up to N-1 compatible queued jobs and run them in one engine session, so prefix
    # grouping spans jobs (worker.job_batch); 1 runs one job at a time.
    ctx.max_batch_jobs = int(os.environ.get("PREFIXQ_BATCH_JOBS", "8"))
    runner.set_context(ctx)
    q = Queue(queue, connection=r_bytes, serializer=JSONSerializer)
    from worker.lifecycle import PrefixqWorker, work_forever
    from worker.reaper import Reaper, ReaperConfig

    def make_rq_worker():
        # a fresh rq worker each time the loop restarts after a Redis outage
        w = PrefixqWorker([q], connection=r_bytes, serializer=JSONSerializer,
                          name=f"prefixq-{ctx.name}-{int(time.time() * 1000) % 10**9}")
        w.stop_event = ctx.stop_event
        ctx.rq_worker = w
        return w

    reaper = Reaper(r_text, r_bytes, ctx.name, ReaperConfig(
        interval_s=float(os.environ.get("PREFIXQ_REAP_INTERVAL_S", "5")),
        grace_s=float(os.environ.get("PREFIXQ_REAP_GRACE_S", "60"))))
    reaper.start()
    stream_bridge = None
    if bridge:  # the plain-Redis submit stream (docs/redis-contract.md), served by every worker
        from worker.stream_bridge import Bridge
        stream_bridge = Bridge(redis_url, queue=queue, consumer=ctx.name).start()
    try:
        work_forever(make_rq_worker, burst, ctx.stop_event)
    finally:
        reaper.stop()
        if stream_bridge is not None:
            stream_bridge.stop()
    return 0
