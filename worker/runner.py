"""Running one job inside the worker process (rq calls `run_job(job_id)`).

Rows stream from the input file in windows; each window is tokenized, passed
through the ordering hook `order_rows(rows) -> rows` (worker.prefix_order when
importable, else identity), and fed to the engine so up to `max_inflight` rows
are in flight (continuous batching needs work queued). Finished rows go to
result shards committed every N rows / M seconds; the final results are
assembled in input order from the committed shards.

Reliability (docs/reliability.md): a run *claims* the job atomically (one run token owns it),
heartbeats from its own thread, and stops quietly if a reaper gave the job to another run.
Store calls ride out outages (storage.retry.OutageRetry: the job pauses). On SIGTERM
(`ctx.stop_event`) the run stops admitting rows, lets in-flight rows finish until
`ctx.drain_seconds`, commits its shard and puts the job back on the queue.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams
from jobs import formats, state
from jobs.client import flush_requeues
from jobs.redact import redact
from storage import open_store
from storage.retry import OutageRetry, StoreUnavailable
from worker import results as res

log = logging.getLogger("prefixq.worker")

try:  # the radix-tree orderer lives in its own module (another engineer's)
    from worker.prefix_order import order_rows as _order_rows
except Exception:  # noqa: BLE001
    try:
        from worker.prefix_order import order_by_prefix as _order_by_prefix

        def _order_rows(rows):
            return [rows[i] for i in _order_by_prefix(rows, key=lambda r: r.prompt_token_ids)]
    except Exception:  # noqa: BLE001
        _order_rows = None

JOB_DEFAULTS = {"max_tokens": 256, "temperature": 1.0}


@dataclass
class PreparedRow:
    """A tokenized row. Supports attribute and item access (row.prompt_token_ids / row['prompt_token_ids'])."""
    index: int
    custom_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def __getitem__(self, k):
        return getattr(self, k)

    def get(self, k, default=None):
        return getattr(self, k, default)


def order_rows(rows: list[PreparedRow]) -> list[PreparedRow]:
    """The ordering hook. Falls back to input order if the orderer fails or returns a non-permutation."""
    if _order_rows is None or len(rows) < 2:
        return rows
    try:
        out = list(_order_rows(rows))
    except Exception:  # noqa: BLE001
        log.exception("order_rows failed; keeping input order")
        return rows
    if len(out) != len(rows) or {id(r) for r in out} != {id(r) for r in rows}:
        log.warning("order_rows returned a non-permutation; keeping input order")
        return rows
    return out


@dataclass
class WorkerContext:
    engine: object
    engine_kind: str
    model: str
    redis: object  # decode_responses=True connection
    metrics: object | None = None
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    window: int = 256
    max_inflight: int = 64
    shard_rows: int = 256
    shard_seconds: float = 10.0
    progress_seconds: float = 1.0
    heartbeat_seconds: float = 5.0
    heartbeat_ttl: float = 30.0   # a worker silent this long is presumed dead by the reaper
    rq_worker: object | None = None
    split_rows: int = 0  # jobs with more rows are split into shard jobs (worker.split_jobs); 0: never
    redis_bytes: object | None = None  # for requeues (rq); made from `redis` when absent
    stop_event: threading.Event = field(default_factory=threading.Event)  # set on SIGTERM
    drain_seconds: float = 30.0   # after SIGTERM, how long in-flight rows may take to finish
    store_outage_s: float = float(os.environ.get("PREFIXQ_STORE_OUTAGE_S", "120"))


_CTX: WorkerContext | None = None


def set_context(ctx: WorkerContext | None) -> None:
    global _CTX
    _CTX = ctx


def run_job(job_id: str) -> dict:
    """rq entry point (JSON-serialized args: just the job id)."""
    if _CTX is None:
        raise RuntimeError("run_job must run inside `prefixq worker` (no engine loaded)")
    from worker import split_jobs  # splits big jobs, runs shards, tags logs with the job id
    ctx = _CTX
    if getattr(ctx, "max_batch_jobs", 1) > 1:  # take compatible queued jobs too: one engine session
        from worker import job_batch
        return split_jobs.run(ctx, job_id, lambda: job_batch.run_batch(ctx, job_id))
    return split_jobs.run(ctx, job_id, lambda: JobRunner(ctx, job_id).run())


class Cancelled(Exception):
    pass


class Drained(Exception):
    """The worker is stopping (SIGTERM): committed what finished, the job goes back on the queue."""


class Superseded(Exception):
    """Another run owns the job now (we were reaped as dead): stop without touching its state."""


SEED_RANGE = (-(1 << 63), 1 << 63)  # the engine hashes seeds as int64


class JobRunner:
    def __init__(self, ctx: WorkerContext, job_id: str):
        self.ctx, self.job_id = ctx, state.validate_job_id(job_id)
        self.r = ctx.redis
        self.prefix = state.job_prefix(job_id)
        self._stop_hb = threading.Event()
        self.token = uuid.uuid4().hex
        self.superseded = threading.Event()
        self.retry = OutageRetry(window_s=ctx.store_outage_s, on_pause=self._set_paused)

    # -- heartbeat ---------------------------------------------------------------
    def _heartbeat_loop(self):
        rq_job = None
        try:
            from rq import get_current_job
            rq_job = get_current_job()
        except Exception:  # noqa: BLE001
            pass
        while not self._stop_hb.is_set():
            try:
                if state.owner_token(self.r, self.job_id) != self.token:
                    log.warning("job %s: another run owns it now; stopping this one", self.job_id)
                    self.superseded.set()
                    return
                self.r.set(state.heartbeat_key(self.job_id), self.ctx.name, ex=max(1, math.ceil(self.ctx.heartbeat_ttl)))
                self.r.hset(state.job_key(self.job_id), "heartbeat_at", time.time())
                w = self.ctx.rq_worker
                if w is not None and rq_job is not None and getattr(w, "execution", None) is not None:
                    w.maintain_heartbeats(rq_job, w.execution)  # keep rq from declaring the job abandoned
            except Exception as e:  # noqa: BLE001 - a Redis blip must not kill the job
                log.warning("heartbeat failed for %s: %s", self.job_id, e)
            self._stop_hb.wait(self.ctx.heartbeat_seconds)

    # -- main ----------------------------------------------------------------------
    def run(self) -> dict:
        rec = state.get(self.r, self.job_id)
        if rec is None:
            raise RuntimeError(f"job {self.job_id} has no record in Redis")
        got, attempt = state.claim(self.r, self.job_id, self.token, self.ctx.name, math.ceil(self.ctx.heartbeat_ttl))
        if got != "ok":
            log.info("job %s is %s; skipping", self.job_id, got)
            return {"status": got}
        hb = threading.Thread(target=self._heartbeat_loop, name=f"hb-{self.job_id}", daemon=True)
        hb.start()
        tmpdir = tempfile.mkdtemp(prefix="prefixq-job-")
        end: tuple[str, dict] | None = None
        try:
            return self._run(rec, attempt, tmpdir)
        except Cancelled:
            log.info("job %s cancelled", self.job_id)
            self._end("cancelled", error="cancelled by user")
            return {"status": "cancelled"}
        except Superseded:
            log.warning("job %s: superseded by another run; left to it", self.job_id)
            return {"status": "superseded"}
        except Drained as e:
            end = ("queued", {"kind": "drained", "error": str(e)})
            return {"status": "requeued"}
        except StoreUnavailable as e:
            end = self._failure_end("store_unavailable", redact(str(e)))
            return {"status": end[0]}
        except Exception as e:  # noqa: BLE001 - a job failure never takes the worker down
            log.exception("job %s failed", self.job_id)
            msg = redact(f"{type(e).__name__}: {e}")[:2000]
            self._end("failed", reason={"kind": "error", "error": msg}, error=msg)
            raise
        finally:
            self._stop_hb.set()
            hb.join(timeout=2)
            if end is not None:  # requeue after the heartbeat stops: the next run may start at once
                status, reason = end
                self._end(status, reason=reason, error=reason["error"] if status == "dead" else "")
                if status == "queued":
                    self._flush_requeues()
            try:  # delete the heartbeat only if it is still ours
                self.r.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
                            "return 0", 1, state.heartbeat_key(self.job_id), self.ctx.name)
            except Exception:  # noqa: BLE001
                pass
            shutil.rmtree(tmpdir, ignore_errors=True)

    def _end(self, status: str, reason: dict | None = None, **fields) -> bool:
        """Leave `running` if this run still owns the job. The reason records the attempt."""
        if reason is not None:
            reason = {"attempt": state.get(self.r, self.job_id).get("attempts"), "worker": self.ctx.name,
                      "at": time.time(), **reason}
        return state.transition(self.r, self.job_id, status, token=self.token, reason=reason, **fields)

    def _failure_end(self, kind: str, msg: str) -> tuple[str, dict]:
        failures = state.failures_since_retry(state.attempt_reasons(self.r, self.job_id)) + 1
        status = "dead" if failures >= state.max_attempts() else "queued"
        log.warning("job %s: %s (failure %d); %s", self.job_id, msg, failures,
                    "moved to dead-letter" if status == "dead" else "requeued")
        return status, {"kind": kind, "error": msg[:2000]}

    def _flush_requeues(self) -> None:
        if self.ctx.redis_bytes is None:
            self.ctx.redis_bytes = state.bytes_twin(self.r)
        try:
            flush_requeues(self.r, self.ctx.redis_bytes)
        except Exception as e:  # noqa: BLE001 - the reaper retries pending requeues
            log.warning("requeue of %s deferred: %s", self.job_id, e)

    def _set_paused(self, why: str | None) -> None:
        try:
            state.update(self.r, self.job_id, paused=why or "")
        except Exception:  # noqa: BLE001 - Redis may be down too; the pause is informational
            pass

    def _progress(self, **fields) -> None:
        """Progress updates tolerate a Redis restart: the job keeps running and commits to the store."""
        try:
            state.update(self.r, self.job_id, **fields)
        except Exception as e:  # noqa: BLE001
            log.warning("job %s: progress update failed (%s); continuing", self.job_id, e)

    def _cancelled(self) -> bool:
        try:
            v = self.r.hget(state.job_key(self.job_id), "cancel_requested")
        except Exception:  # noqa: BLE001 - Redis restarting: ask again next time
            return False
        return v not in (None, "", "0")

    def _prepare(self, row: dict, settings: dict) -> PreparedRow:
        tok = self.ctx.engine.tokenizer
        max_len = int(getattr(self.ctx.engine, "max_model_len", 0) or 0)
        p = PreparedRow(row["index"], row["custom_id"], [], None)
        try:
            merged = dict(JOB_DEFAULTS)
            merged.update(settings)
            merged.update(row["params"])
            seed = merged.get("seed")
            if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
                raise ValueError(f"invalid sampling value: seed must fit in 64 bits, got {seed}")
            if isinstance(merged.get("top_k"), int) and merged["top_k"] > (1 << 31):
                merged["top_k"] = 0  # larger than any vocabulary: same as off
            p.params = SamplingParams(**merged)
        except (ValueError, TypeError, OverflowError) as e:
            p.error = str(e)
            return p
        try:
            if row.get("messages") is not None:
                text = tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tok(row["prompt"])["input_ids"]
        except Exception as e:  # noqa: BLE001
            p.error = f"cannot tokenize prompt: {e}"
            return p
        p.prompt_token_ids = list(ids)
        if not ids:
            p.error = "prompt is empty (0 tokens)"
        elif max_len and len(ids) >= max_len:
            p.error = f"prompt is {len(ids)} tokens, longer than the model's context of {max_len} tokens"
        elif max_len and len(ids) + p.params.max_tokens > max_len:
            p.params.max_tokens = max_len - len(ids)  # finishes with 'length' at the context end
        return p

    def _check_keys(self, rec: dict) -> None:
        """Keys come from the Redis record; a planted record must not read or write outside the job."""
        for k in ("input_key", "results_key", "manifest_key", "errors_key"):
            v = rec.get(k)
            if k == "errors_key" and not v:
                continue
            if not isinstance(v, str) or not v.startswith(self.prefix + "/"):
                raise ValueError(f"job record field {k} is outside the job's prefix {self.prefix}/")

    def _run(self, rec: dict, attempt: int, tmpdir: str) -> dict:
        ctx, eng = self.ctx, self.ctx.engine
        t_start = time.time()
        self._check_keys(rec)
        store = open_store(rec.get("store_url") or None)
        retry = self.retry
        ext_in = rec["input_format"]
        local = os.path.join(tmpdir, "input." + ("parquet" if ext_in == "parquet" else "jsonl"))
        retry("download input", lambda: store.get_file(rec["input_key"], local))
        total = int(rec["total"])
        out_ext = rec["output_format"]
        settings = rec.get("settings") or {}
        if isinstance(settings, str):
            settings = json.loads(settings)

        committed = retry("load commits", lambda: res.load_commits(store, self.prefix, total))
        writer = res.ShardWriter(store, self.prefix, out_ext, committed.next_seq, attempt, ctx.name,
                                 ctx.shard_rows, ctx.shard_seconds, retry=retry)
        done, failed = committed.ok, committed.failed
        self._progress(done=done, failed=failed)
        if committed.count():
            log.info("job %s: resuming, %d rows already committed", self.job_id, committed.count())
        stats0 = dict(eng.stats())
        rows_iter = (r for r in formats.iter_rows(local, ext_in, rec.get("kind")) if not committed.done[r["index"]])
        ready: deque[PreparedRow] = deque()
        exhausted = False
        inflight: dict[str, tuple[PreparedRow, float]] = {}
        last_progress = time.monotonic()
        new_rows = 0
        t_rows = time.monotonic()
        drain_until: float | None = None

        def finish(p: PreparedRow, text, reason, ptoks, ctoks, err, latency_s):
            nonlocal done, failed, new_rows
            writer.add({"row": p.index, "custom_id": p.custom_id, "text": text, "finish_reason": reason,
                        "prompt_tokens": ptoks, "completion_tokens": ctoks, "error": err,
                        "latency_ms": round(latency_s * 1000.0, 3)})
            if reason == "error":
                failed += 1
            else:
                done += 1
            new_rows += 1

        def abort_inflight():
            for rid in list(inflight):
                eng.abort(rid)
            inflight.clear()

        while True:
            if self.superseded.is_set():
                abort_inflight()
                raise Superseded()
            if drain_until is None and ctx.stop_event.is_set():
                drain_until = time.monotonic() + ctx.drain_seconds  # stop admitting; finish in-flight rows
                log.info("job %s: stopping: %d rows in flight get %.0fs to finish", self.job_id, len(inflight),
                         ctx.drain_seconds)
            if drain_until is not None and (not inflight or time.monotonic() >= drain_until):
                n_abort = len(inflight)
                abort_inflight()
                writer.flush()
                raise Drained(f"worker {ctx.name} stopping: committed {writer.committed_rows} new rows, "
                              f"{n_abort} unfinished rows left for the next run")
            # refill the ready queue one window at a time, through the ordering hook
            if drain_until is None and not exhausted and len(ready) < ctx.max_inflight:
                window = []
                for row in rows_iter:
                    window.append(self._prepare(row, settings))
                    if len(window) >= ctx.window:
                        break
                else:
                    exhausted = True
                good = []
                for p in window:
                    if p.error:
                        finish(p, "", "error", len(p.prompt_token_ids), 0, p.error, 0.0)
                        if ctx.metrics:
                            ctx.metrics.rows_failed.inc()
                    else:
                        good.append(p)
                ready.extend(order_rows(good))
            # keep the engine fed
            while drain_until is None and ready and len(inflight) < ctx.max_inflight:
                p = ready.popleft()
                rid = str(p.index)
                inflight[rid] = (p, time.monotonic())
                eng.add_request(rid, p.prompt_token_ids, p.params, job_id=self.job_id)
            if not inflight and not ready and exhausted:
                break
            if inflight:
                for out in eng.step():
                    item = inflight.pop(out.request_id, None)
                    if item is None:
                        continue
                    p, t0 = item
                    lat = time.monotonic() - t0
                    reason = out.finish_reason or ("length" if out.finished else "error")
                    if reason not in ("stop", "length", "error"):
                        reason = "stop"
                    err = out.error if reason == "error" else None
                    if reason == "error" and not err:
                        err = "engine error"
                    finish(p, out.text or "", reason, len(out.prompt_token_ids or p.prompt_token_ids),
                           len(out.token_ids or []), err, lat)
                    if ctx.metrics:
                        ctx.metrics.observe_output(out, lat)
            if writer.due():
                writer.flush()
            now = time.monotonic()
            if now - last_progress >= ctx.progress_seconds:
                last_progress = now
                if self._cancelled():
                    abort_inflight()
                    writer.flush()
                    raise Cancelled()
                rps = new_rows / max(1e-6, now - t_rows)
                self._progress(done=done, failed=failed, rows_per_s=round(rps, 3))
                if ctx.metrics:
                    ctx.metrics.observe_engine(eng.stats(), stats0)
        writer.flush()
        if self._cancelled():
            raise Cancelled()
        if self.superseded.is_set():
            raise Superseded()

        # assemble the final results in input order, streaming, write-once
        rows = res.assemble(store, self.prefix, total, out_ext, tmpdir=tmpdir, retry=retry)
        stats = dict(eng.stats())
        if ctx.metrics:
            ctx.metrics.observe_engine(stats, stats0)
        delta = {k: (v - stats0.get(k, 0)) if isinstance(v, (int, float)) and k != "kv_usage" else v
                 for k, v in stats.items()}
        if rec.get("kind") == "openai":
            endpoints = {r["index"]: r["endpoint"] for r in formats.iter_rows(local, ext_in, "openai")
                         if r["endpoint"] != "/v1/chat/completions"}
            written = res.write_openai(store, rec["results_key"], rec["errors_key"], rows, endpoints, rec["model"],
                                       int(t_start), tmpdir, retry=retry)
        else:
            written = res.write_native(store, rec["results_key"], rows, out_ext, tmpdir, retry=retry)
        n_ok, n_fail = written.ok, written.failed
        pt, ct = written.prompt_tokens, written.completion_tokens
        elapsed = time.time() - t_start
        hit = (delta.get("cached_tokens", 0) / delta["prompt_tokens"]) if delta.get("prompt_tokens") else 0.0
        # Rates are recomputed from this job's counter deltas (a difference of cumulative rates means nothing).
        ratio = lambda a, b: (delta.get(a, 0) / delta[b]) if delta.get(b) else 0.0  # noqa: E731
        delta.update(prefix_cache_hit_rate=hit, spec_acceptance_rate=ratio("spec_accepted", "spec_proposed"),
                     spec_mean_accepted_length=ratio("spec_accepted", "spec_verifications"))
        manifest = {
            "job_id": self.job_id, "status": "succeeded", "model": rec["model"], "engine": ctx.engine_kind,
            "input": rec["input_key"], "input_format": ext_in, "kind": rec.get("kind"),
            "results": rec["results_key"], "errors": rec.get("errors_key") or None,
            "output_format": out_ext, "settings": {**JOB_DEFAULTS, **settings},
            "counts": {"total": total, "succeeded": n_ok, "failed": n_fail},
            "tokens": {"prompt": pt, "completion": ct},
            "timings": {"created_at": rec.get("created_at"), "started_at": t_start, "finished_at": time.time(),
                        "run_seconds": round(elapsed, 3),
                        "rows_per_s": round(new_rows / elapsed, 3) if elapsed > 0 else None,
                        "output_tokens_per_s": round(ct / elapsed, 3) if elapsed > 0 else None},
            "attempts": attempt, "worker": ctx.name,
            "prefix_cache_hit_rate": round(hit, 6),
            "speculative": {"proposed": delta.get("spec_proposed", 0), "accepted": delta.get("spec_accepted", 0),
                            "acceptance_rate": round(delta["spec_acceptance_rate"], 6),
                            "mean_accepted_length": round(delta["spec_mean_accepted_length"], 6)},
            "engine_stats": {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in delta.items()},
            "shards": len(retry("load commits", lambda: res.load_commits(store, self.prefix, total)).records),
        }

        def put_manifest():
            try:  # write-once like the results: a second run of a finished job changes nothing
                store.put_bytes(rec["manifest_key"], json.dumps(manifest, indent=2).encode(), if_none_match=True)
            except res.AlreadyExists:
                pass
        retry("put manifest", put_manifest)
        self._end("succeeded", done=n_ok, failed=n_fail, error="", rows_per_s=manifest["timings"]["rows_per_s"] or 0)
        log.info("job %s succeeded: %d ok, %d failed, %.1fs", self.job_id, n_ok, n_fail, elapsed)
        return {"status": "succeeded", "ok": n_ok, "failed": n_fail}
