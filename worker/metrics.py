"""Prometheus metrics of a worker (names documented in docs/metrics.md)."""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

_LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _QueueCollector:
    """Reads queue depth and jobs by state from Redis at scrape time."""

    def __init__(self, redis_conn):
        self.r = redis_conn

    def describe(self):
        return []

    def collect(self):
        from jobs import state
        try:
            counts = state.counts_by_state(self.r)
        except Exception as e:  # noqa: BLE001 - a Redis blip must not break /metrics
            log.debug("metrics: redis unavailable: %s", e)
            return
        depth = GaugeMetricFamily("prefixq_queue_depth", "Jobs queued or running (what an autoscaler should scale on)")
        depth.add_metric([], counts.get("queued", 0) + counts.get("running", 0))
        yield depth
        jobs = GaugeMetricFamily("prefixq_jobs", "Jobs by state", labels=["state"])
        for s, n in counts.items():
            jobs.add_metric([s], n)
        yield jobs


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, redis_conn=None):
        self.registry = registry or CollectorRegistry()
        R = self.registry
        self.rows_completed = Counter("prefixq_rows_completed", "Rows finished without error", registry=R)
        self.rows_failed = Counter("prefixq_rows_failed", "Rows finished with an error", registry=R)
        self.prompt_tokens = Counter("prefixq_prompt_tokens", "Prompt tokens processed", registry=R)
        self.cached_prompt_tokens = Counter("prefixq_cached_prompt_tokens", "Prompt tokens served from the prefix cache", registry=R)
        self.output_tokens = Counter("prefixq_output_tokens", "Output tokens generated", registry=R)
        self.ttft = Histogram("prefixq_ttft_seconds", "Time to first token per row", buckets=_LAT_BUCKETS, registry=R)
        self.tpot = Histogram("prefixq_time_per_output_token_seconds", "Decode time per output token per row",
                              buckets=_TPOT_BUCKETS, registry=R)
        self.row_latency = Histogram("prefixq_row_latency_seconds", "Row latency from engine admission to finish",
                                     buckets=_LAT_BUCKETS, registry=R)
        self.kv_cache_usage = Gauge("prefixq_kv_cache_usage_ratio", "KV cache blocks in use (0..1)", registry=R)
        self.prefix_hit_rate = Gauge("prefixq_prefix_cache_hit_rate", "Cached prompt tokens / prompt tokens, current job", registry=R)
        self.spec_acceptance = Gauge("prefixq_spec_acceptance_rate", "Accepted / proposed speculative tokens", registry=R)
        self.spec_accepted_length = Gauge("prefixq_spec_mean_accepted_length",
                                          "Draft tokens accepted per verification, current job", registry=R)
        self.cascade_steps = Gauge("prefixq_cascade_decode_steps",
                                   "Decode steps that read shared prefixes once per group (cascade attention), "
                                   "since the engine started", registry=R)
        self.burst_steps = Gauge("prefixq_burst_decode_steps",
                                 "Decode steps run inside bursts after a burst's first (num_scheduler_steps), "
                                 "since the engine started", registry=R)
        self.model_load_seconds = Gauge("prefixq_model_load_seconds", "Seconds the model took to load", registry=R)
        self.gpu_memory = Gauge("prefixq_gpu_memory_bytes", "GPU memory allocated by this worker", registry=R)
        self.gpu_memory.set_function(_gpu_memory)
        if redis_conn is not None:
            R.register(_QueueCollector(redis_conn))

    def observe_output(self, out, latency_s: float) -> None:
        if out.finish_reason == "error":
            self.rows_failed.inc()
            return
        self.rows_completed.inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.cached_prompt_tokens.inc(out.num_cached_tokens or 0)
        self.output_tokens.inc(len(out.token_ids))
        self.row_latency.observe(latency_s)
        if out.first_token_time is not None and out.arrival_time:
            self.ttft.observe(max(0.0, out.first_token_time - out.arrival_time))
            if out.finish_time is not None and len(out.token_ids) > 1:
                self.tpot.observe(max(0.0, (out.finish_time - out.first_token_time) / (len(out.token_ids) - 1)))

    def observe_engine(self, stats: dict, base: dict | None = None) -> None:
        base = base or {}
        if "kv_usage" in stats:
            self.kv_cache_usage.set(float(stats["kv_usage"]))
        pt = stats.get("prompt_tokens", 0) - base.get("prompt_tokens", 0)
        ct = stats.get("cached_tokens", 0) - base.get("cached_tokens", 0)
        if pt > 0:
            self.prefix_hit_rate.set(ct / pt)
        sp = stats.get("spec_proposed", 0)
        if sp:
            self.spec_acceptance.set(stats.get("spec_accepted", 0) / sp)
        verifications = stats.get("spec_verifications", 0) - base.get("spec_verifications", 0)
        if verifications > 0:
            accepted = stats.get("spec_accepted", 0) - base.get("spec_accepted", 0)
            self.spec_accepted_length.set(accepted / verifications)
        if "cascade_steps" in stats:
            self.cascade_steps.set(float(stats["cascade_steps"]))
        if "burst_steps" in stats:
            self.burst_steps.set(float(stats["burst_steps"]))

    def serve(self, port: int, addr: str = "0.0.0.0"):
        if not port:
            return None
        return start_http_server(port, addr=addr, registry=self.registry)


def _gpu_memory() -> float:
    try:
        import torch
        if torch.cuda.is_available():
            return float(torch.cuda.memory_allocated())
    except Exception:  # noqa: BLE001
        pass
    return 0.0
