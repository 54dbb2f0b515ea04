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
               device: str | None = None, max_num_seqs: int = 32, max_inflight: int | None = None,
               window: int = 256, shard_rows: int = 256, shard_seconds: float = 10.0,
               split_rows: int = 0, bridge: bool = False) -> int:
    import redis
    from rq import Queue, SimpleWorker
    from rq.serializers import JSONSerializer

    from jobs import state
    from worker import runner
    from worker.engine_factory import make_engine
    from worker.metrics import Metrics

    redis_url = redis_url or state.redis_url()
    model = model or os.environ.get("PREFIXQ_MODEL", "smollm2")
    queue = queue or os.environ.get("PREFIXQ_QUEUE", state.DEFAULT_QUEUE)
    r_text = state.connect(redis_url)
    r_bytes = redis.Redis.from_url(redis_url)

    metrics = Metrics(redis_conn=r_text)
    if metrics_port:
        metrics.serve(metrics_port)
        log.info("metrics on :%d/metrics", metrics_port)

    t0 = time.monotonic()
    eng, kind = make_engine(engine, model, device=device, max_num_seqs=max_num_seqs)
    load_s = time.monotonic() - t0
    metrics.model_load_seconds.set(load_s)
    log.info("loaded %s with engine %s in %.1fs", model, kind, load_s)

    ctx = runner.WorkerContext(engine=eng, engine_kind=kind, model=model, redis=r_text, metrics=metrics,
                               window=window, max_inflight=max_inflight or max(8, 2 * max_num_seqs),
                               shard_rows=shard_rows, shard_seconds=shard_seconds)
    ctx.split_rows = split_rows
    runner.set_context(ctx)
    q = Queue(queue, connection=r_bytes, serializer=JSONSerializer)
    w = SimpleWorker([q], connection=r_bytes, serializer=JSONSerializer, name=f"prefixq-{ctx.name}")
    ctx.rq_worker = w
    stream_bridge = None
    if bridge:  # the plain-Redis submit stream (docs/redis-contract.md), served by every worker
        from worker.stream_bridge import Bridge
        stream_bridge = Bridge(redis_url, queue=queue, consumer=ctx.name).start()
    try:
        w.work(burst=burst, logging_level="INFO", with_scheduler=False)
    finally:
        if stream_bridge is not None:
            stream_bridge.stop()
    return 0
