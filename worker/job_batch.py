"""Run several queued jobs for the same model through ONE engine session, ordered together by prefix.

When the worker takes a job it also takes up to `max_batch_jobs - 1` compatible jobs that are
already queued (same model, same engine settings, not to be split). Each job still runs through its
own `worker.runner.JobRunner` — claim, heartbeat, result shards, progress, cancel, failures and
manifest stay per job and use the runner's code unchanged. What they share is the engine: each
runner gets a `JobEngine` proxy in place of the engine, and the proxies feed one `BatchSession`.

The session gathers the rows every job has handed it (each runner reads up to `window_rows / jobs`
rows ahead), orders them together with `WindowedPrefixOrderer` (radix-tree DFS over rows of all
jobs, interleaved with `interleave_jobs`), and feeds the real engine with at most `max_inflight`
rows in it, as the runner would. Request ids are `<job_id>/<row index>`, so every output goes back
to its own job. A row that shares a full KV block with the row fed just before it waits while that
row is still computing the shared prefix (blocks are cached only once computed; otherwise both
would compute it in the same step).

Per-job engine counters (`prompt_tokens`, `cached_tokens`, `generated_tokens`, `finished`) come
from that job's own outputs, so its manifest's `prefix_cache_hit_rate` is its own, hits on blocks
another job computed included. Engine-wide counters (`prefix_hit_tokens`, steps, ...) cover the
whole session, and `batch_jobs` in the stats names the jobs that shared it.

Each companion runs in a thread of its own; whichever runner calls `step()` steps the engine for
all of them, under one lock. A job claimed here that the worker loses is recovered like any other
running job: by the reaper, once its heartbeat stops.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import deque

from jobs import state
from worker.prefix_order import PromptRow, WindowedPrefixOrderer, interleave_jobs

log = logging.getLogger("prefixq.worker")

DEFAULT_WINDOW_ROWS = 50_000
GATHER_SECONDS = 2.0  # how long ordering waits for every job to hand over its rows


def compat_key(rec: dict) -> tuple:
    """Jobs that may share an engine session: same model and same engine settings."""
    eng = rec.get("engine_settings") or {}
    if isinstance(eng, str):
        try:
            eng = json.loads(eng)
        except ValueError:
            pass
    return (rec.get("model") or "", json.dumps(eng, sort_keys=True) if isinstance(eng, dict) else str(eng))



class BatchSession:
    """One engine shared by several jobs; rows of all jobs are ordered together by prefix."""

    def __init__(self, engine, max_inflight: int, window_rows: int = DEFAULT_WINDOW_ROWS,
                 gather_seconds: float = GATHER_SECONDS) -> None:
        self.engine = engine
        self.max_inflight = max_inflight
        self.orderer = WindowedPrefixOrderer(window_rows=window_rows)
        self.gather_seconds = gather_seconds
        self.cond = threading.Condition()
        self.live: set[str] = set()  # jobs still running
        self.in_step: set[str] = set()  # jobs waiting in step(): they have handed over their rows
        self.incoming: dict[str, dict[str, tuple]] = {}  # job -> rid -> (tokens, params), not yet ordered
        self.queue: deque[PromptRow] = deque()  # ordered, not yet in the engine
        self.params: dict[tuple[str, str], object] = {}
        self.in_engine: set[str] = set()  # full request ids
        self.outbox: dict[str, list] = {}
        self.counters: dict[str, dict[str, int]] = {}
        self._gather_since: float | None = None

    def join(self, job_id: str) -> JobEngine:
        with self.cond:
            self.live.add(job_id)
            self.incoming.setdefault(job_id, {})
            self.outbox.setdefault(job_id, [])
            self.counters.setdefault(job_id, {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                                              "finished": 0})
        return JobEngine(self, job_id)

    def leave(self, job_id: str) -> None:
        with self.cond:
            self.live.discard(job_id)
            self.in_step.discard(job_id)
            for rid in list(self.incoming.pop(job_id, {})):
                self.params.pop((job_id, rid), None)
            self.queue = deque(r for r in self.queue if r.job_id != job_id)
            for full in [f for f in self.in_engine if f.startswith(job_id + "/")]:
                self.engine.abort(full)
                self.in_engine.discard(full)
            self.cond.notify_all()

    # -- calls from one job's runner (through its JobEngine) ---------------------------------------
    def add(self, job_id: str, rid: str, tokens, params) -> None:
        with self.cond:
            self.incoming[job_id][rid] = (list(tokens), params)

    def abort(self, job_id: str, rid: str) -> None:
        with self.cond:
            if self.incoming.get(job_id, {}).pop(rid, None) is not None:
                return
            before = len(self.queue)
            self.queue = deque(r for r in self.queue if not (r.job_id == job_id and r.row_index == rid))
            if len(self.queue) != before:
                self.params.pop((job_id, rid), None)
                return
            full = f"{job_id}/{rid}"
            if full in self.in_engine:
                self.engine.abort(full)
                self.in_engine.discard(full)

    def step(self, job_id: str) -> list:
        with self.cond:
            self.in_step.add(job_id)
            try:
                while True:
                    if self.outbox[job_id]:
                        out, self.outbox[job_id] = self.outbox[job_id], []
                        return out
                    if not self.queue and any(self.incoming.values()):
                        if not self._ready_to_order():
                            self.cond.wait(0.05)
                            if not self.engine.has_unfinished():
                                continue  # nothing to step meanwhile
                        else:
                            self._order_incoming()
                    if not self.queue and not self.engine.has_unfinished():
                        if not any(self.incoming.values()):
                            return []  # nothing of ours left anywhere: let the runner move on
                        continue
                    self._feed()
                    self._step_engine()
                    self.cond.notify_all()
                    out, self.outbox[job_id] = self.outbox[job_id], []
                    return out
            finally:
                self.in_step.discard(job_id)

    # -- inside the lock ---------------------------------------------------------------------------
    def _ready_to_order(self) -> bool:
        """Order when every live job has handed over its rows (all wait in step()), or after a while."""
        if self.live <= self.in_step:
            self._gather_since = None
            return True
        now = time.monotonic()
        if self._gather_since is None:
            self._gather_since = now
        if now - self._gather_since >= self.gather_seconds:
            self._gather_since = None
            return True
        return False

    def _order_incoming(self) -> None:
        jobs = {}
        for job_id, rows in self.incoming.items():
            if rows:
                jobs[job_id] = rows
                self.incoming[job_id] = {}
        rids = {j: list(rows) for j, rows in jobs.items()}
        for j, rows in jobs.items():
            for rid, (_, params) in rows.items():
                self.params[(j, rid)] = params
        stream = (PromptRow(r.job_id, rids[r.job_id][r.row_index], r.token_ids)
                  for r in interleave_jobs({j: [t for t, _ in rows.values()] for j, rows in jobs.items()}))
        for window in self.orderer.windows(stream):
            self.queue.extend(window)

    def _feed(self) -> None:
        eng = self.engine
        while self.queue and len(self.in_engine) < self.max_inflight:
            # Rows sharing a prefix may go in together: the scheduler admits a row whose prefix
            # another row computes in the same step one step later, as a cache hit.
            row = self.queue.popleft()
            full = f"{row.job_id}/{row.row_index}"
            params = self.params.pop((row.job_id, row.row_index), None)
            self.in_engine.add(full)
            eng.add_request(full, row.token_ids, params, job_id=row.job_id)

    def _step_engine(self) -> None:
        for out in self.engine.step():
            full = out.request_id
            self.in_engine.discard(full)
            job_id, _, rid = full.partition("/")
            if job_id not in self.outbox:
                continue
            c = self.counters[job_id]
            c["finished"] += 1
            if out.finish_reason != "error":
                c["prompt_tokens"] += len(out.prompt_token_ids or [])
                c["cached_tokens"] += int(out.num_cached_tokens or 0)
                c["generated_tokens"] += len(out.token_ids or [])
            self.outbox[job_id].append(dataclasses.replace(out, request_id=rid))

    def stats(self, job_id: str) -> dict:
        with self.cond:
            s = dict(self.engine.stats())
            s.update(self.counters[job_id])
            pt = s["prompt_tokens"]
            s["prefix_cache_hit_rate"] = s["cached_tokens"] / pt if pt else 0.0
            s["batch_jobs"] = ",".join(sorted(self.counters))
            return s


class JobEngine:
    """What one job's runner sees in place of the engine: its own rows and counters only."""

    def __init__(self, session: BatchSession, job_id: str) -> None:
        self.session, self.job_id = session, job_id
        self.tokenizer = session.engine.tokenizer
        self.max_model_len = getattr(session.engine, "max_model_len", 0)
        self.config = getattr(session.engine, "config", None)

    def add_request(self, request_id: str, prompt_token_ids, params=None, job_id: str | None = None) -> None:
        self.session.add(self.job_id, str(request_id), prompt_token_ids, params)

    def step(self) -> list:
        return self.session.step(self.job_id)

    def abort(self, request_id: str) -> None:
        self.session.abort(self.job_id, str(request_id))

    def stats(self) -> dict:
        return self.session.stats(self.job_id)

    def has_unfinished(self) -> bool:
        return self.session.engine.has_unfinished()


# -- taking compatible queued jobs ------------------------------------------------------------------
def take_companions(ctx, job_id: str, max_jobs: int) -> list[str]:
    """Up to max_jobs - 1 jobs already queued that are compatible with job_id, removed from the rq
    queue (LREM is atomic: a job another worker popped first is not ours). Their runs then claim
    them as usual, so a job can never run twice."""
    if max_jobs <= 1:
        return []
    r = ctx.redis
    rec = state.get(r, job_id)
    if rec is None:
        return []
    key = compat_key(rec)
    split_rows = int(getattr(ctx, "split_rows", 0) or 0)
    queue_name = rec.get("queue") or state.DEFAULT_QUEUE
    rq_key = f"rq:queue:{queue_name}"
    taken: list[str] = []
    for other in r.lrange(rq_key, 0, -1):
        if len(taken) >= max_jobs - 1:
            break
        if other == job_id:
            continue
        try:
            o = state.get(r, other)
        except ValueError:
            continue
        if (o is None or o.get("status") != "queued" or compat_key(o) != key or o.get("parent")
                or o.get("split_shards") or int(o.get("cancel_requested") or 0)
                or (split_rows and int(o.get("total") or 0) > split_rows)):
            continue
        if r.lrem(rq_key, 1, other) == 1:
            taken.append(other)
    return taken


def run_batch(ctx, job_id: str, max_jobs: int | None = None, window_rows: int | None = None) -> dict:
    """Run job_id together with compatible queued jobs; returns job_id's result (as JobRunner.run)."""
    from worker.runner import JobRunner
    max_jobs = int(max_jobs or getattr(ctx, "max_batch_jobs", 1) or 1)
    window_rows = int(window_rows or getattr(ctx, "batch_window_rows", DEFAULT_WINDOW_ROWS))
    companions = take_companions(ctx, job_id, max_jobs)
    if not companions:
        return JobRunner(ctx, job_id).run()
    jobs = [job_id] + companions
    log.info("job %s: running in one engine session with %s", job_id, ", ".join(companions))
    session = BatchSession(ctx.engine, ctx.max_inflight, window_rows)
    per_job = max(ctx.window, window_rows // len(jobs))
    results: dict[str, dict] = {}

    def run_one(j: str) -> dict:
        jctx = dataclasses.replace(ctx, engine=session.join(j), max_inflight=per_job, window=per_job)
        try:
            return JobRunner(jctx, j).run()
        finally:
            session.leave(j)

    def companion(j: str) -> None:
        try:
            results[j] = run_one(j)
        except Exception as e:  # noqa: BLE001 - the runner has already marked the job failed
            results[j] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}

    threads = [threading.Thread(target=companion, args=(j,), name=f"batch-{j}", daemon=True) for j in companions]
    for j in companions:  # joined before any thread starts, so the first ordering waits for all
        session.join(j)
    session.join(job_id)
    for t in threads:
        t.start()
    try:
        return run_one(job_id)  # in this (rq's) thread, so rq's heartbeat maintenance sees the job
    finally:
        for t in threads:
            t.join()
        log.info("batch of %s done: %s", job_id, {j: r.get("status") for j, r in results.items()})
