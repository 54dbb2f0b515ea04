"""One job over many workers: split a big job into shard jobs, merge their results back.

The first worker to run a job with more rows than the split threshold (the job's `--split-rows`,
else the worker's) tokenizes it, plans shards with `worker.sharding.plan_shards` (shared prefixes
stay in one shard, since each worker's prefix cache is its own), writes each shard's rows as a
JSONL input and enqueues the shards as ordinary jobs `<parent>-s0000`, `<parent>-s0001`, ...
Idle workers take them in parallel; each prefix-orders within its shard as usual.

While a shard runs, its worker adds up every shard's progress into the parent record, passes a
cancel of the parent down to the shard, and keeps the parent's heartbeat alive (long TTL: between
shards nobody runs the parent, and the reaper must not requeue it). The shard that finds every
shard done (SADD + SCARD in one MULTI) merges the shard results in input order
(`merge_in_input_order`) into the parent's results, written once (If-None-Match).

Store layout beside the parent's usual keys: `jobs/<parent>/split/plan.json` (write-once):
{"parent", "total", "shards": [{"id", "rows": [parent row indices, in shard order]}]}.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from jobs import formats, state
from jobs.inputs import split_rows_key
from storage import open_store
from storage.base import AlreadyExists
from worker import results as res
from worker.logging_setup import job_context
from worker.sharding import merge_in_input_order, plan_shards

log = logging.getLogger("prefixq.split")
PARENT_HEARTBEAT_S = 86400
PROGRESS_S = 1.0


@dataclass(frozen=True)
class Plan:
    parent: str
    total: int
    shards: list[tuple[str, list[int]]]  # (shard job id, parent row indices in shard order)

    def to_json(self) -> bytes:
        return json.dumps({"parent": self.parent, "total": self.total,
                           "shards": [{"id": s, "rows": rows} for s, rows in self.shards]}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Plan:
        d = json.loads(data)
        return cls(d["parent"], d["total"], [(s["id"], s["rows"]) for s in d["shards"]])


def plan_key(job_id: str) -> str:
    return f"{state.job_prefix(job_id)}/split/plan.json"


def shard_id(parent: str, k: int) -> str:
    return state.validate_job_id(f"{parent}-s{k:04d}")


def done_set(parent: str) -> str:
    return state.job_key(parent) + ":shards_done"


def threshold(r, job_id: str, worker_default: int) -> int:
    v = r.get(split_rows_key(job_id))
    return int(v) if v not in (None, "") else int(worker_default)


def run(ctx, job_id: str, run_one: Callable[[], dict]) -> dict:
    """rq entry point around a normal run: split, run a shard, or just run."""
    with job_context(job_id):
        rec = state.get(ctx.redis, job_id)
        if rec is None:
            return run_one()
        if rec.get("parent"):
            return _run_shard(ctx, rec, run_one)
        if rec.get("split_shards") or _needs_split(ctx, rec):
            return split(ctx, rec)
        return run_one()


def _needs_split(ctx, rec: dict) -> bool:
    limit = threshold(ctx.redis, rec["id"], getattr(ctx, "split_rows", 0))
    return limit > 0 and int(rec.get("total") or 0) > limit and rec["status"] not in state.TERMINAL


# -- splitting ------------------------------------------------------------------------------------

def _native_row(row: dict) -> dict:
    out = {"custom_id": row["custom_id"], **row["params"]}
    if row.get("messages") is not None:
        out["messages"] = row["messages"]
    else:
        out["prompt"] = row["prompt"]
    return out


def split(ctx, rec: dict) -> dict:
    """Plan and enqueue the shards (idempotent: a rerun after a crash reuses the plan)."""
    from worker.runner import JobRunner

    r, job_id = ctx.redis, rec["id"]
    if rec["status"] in state.TERMINAL:
        return {"status": rec["status"]}
    store = open_store(rec.get("store_url") or None)
    r.set(state.heartbeat_key(job_id), "split", ex=PARENT_HEARTBEAT_S)
    state.set_status(r, job_id, "running", started_at=rec.get("started_at") or time.time(), worker="split")
    tmp = tempfile.mkdtemp(prefix="prefixq-split-")
    try:
        try:
            plan = Plan.from_json(store.get_bytes(plan_key(job_id)))
            rows_by_index = None
        except FileNotFoundError:
            plan, rows_by_index = _plan(ctx, JobRunner(ctx, job_id), rec, store, tmp)
            try:
                store.put_bytes(plan_key(job_id), plan.to_json(), if_none_match=True)
            except AlreadyExists:
                plan = Plan.from_json(store.get_bytes(plan_key(job_id)))
        state.update(r, job_id, split_shards=len(plan.shards))
        created = 0
        for sid, rows in plan.shards:
            if state.get(r, sid) is not None:
                continue  # made by an earlier run of this split
            if rows_by_index is None:
                rows_by_index = _read_rows(store, rec, tmp)
            _create_shard(ctx, rec, store, sid, [rows_by_index[i] for i in rows], tmp)
            created += 1
        log.info("job %s: %d rows split into %d shards (%d enqueued now)", job_id, plan.total,
                 len(plan.shards), created)
        if r.scard(done_set(job_id)) >= len(plan.shards):
            merge(ctx, state.get(r, job_id))
        return {"status": "split", "shards": len(plan.shards)}
    except Exception as e:
        # the long parent heartbeat would otherwise hide a parent that can never finish
        state.set_status(r, job_id, "failed", error=f"split failed: {type(e).__name__}: {e}"[:2000])
        r.delete(state.heartbeat_key(job_id))
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_rows(store, rec: dict, tmp: str) -> list[dict]:
    local = os.path.join(tmp, "input." + ("parquet" if rec["input_format"] == "parquet" else "jsonl"))
    if not os.path.exists(local):
        store.get_file(rec["input_key"], local)
    return list(formats.iter_rows(local, rec["input_format"], rec.get("kind")))


def _plan(ctx, runner, rec: dict, store, tmp: str) -> tuple[Plan, list[dict]]:
    rows = _read_rows(store, rec, tmp)
    settings = rec.get("settings") or {}
    # rows that will fail anyway still need a place: an empty prompt sorts first, costs nothing
    ids = [runner._prepare(row, settings).prompt_token_ids for row in rows]
    limit = threshold(ctx.redis, rec["id"], getattr(ctx, "split_rows", 0))
    block = int(getattr(ctx.engine, "block_size", 16) or 16)
    groups = plan_shards(ids, limit, block_size=block)
    return Plan(rec["id"], len(rows), [(shard_id(rec["id"], k), g) for k, g in enumerate(groups)]), rows


def _create_shard(ctx, parent: dict, store, sid: str, rows: list[dict], tmp: str) -> None:
    from jobs.client import enqueue_run  # the same enqueue path as submit

    path = os.path.join(tmp, f"{sid}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_native_row(row), ensure_ascii=False) + "\n")
    prefix = state.job_prefix(sid)
    store.put_file(f"{prefix}/input.jsonl", path)
    queue = parent.get("queue") or state.DEFAULT_QUEUE
    state.create(ctx.redis, sid, {
        "queue": queue, "model": parent.get("model"), "store_url": store.url,
        "input_key": f"{prefix}/input.jsonl", "input_format": "jsonl", "kind": "native",
        "output_format": "jsonl", "settings": parent.get("settings") or {}, "total": len(rows),
        "source_name": f"{parent['id']} shard", "parent": parent["id"],
        "results_key": f"{prefix}/results.jsonl", "manifest_key": f"{prefix}/manifest.json", "errors_key": "",
    })
    enqueue_run(_bytes_conn(ctx.redis), queue, sid)


def _bytes_conn(r):
    """rq needs a bytes connection to the same server as our text one."""
    import redis
    pool = r.connection_pool
    kw = {**pool.connection_kwargs, "decode_responses": False}
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kw))


# -- running a shard ------------------------------------------------------------------------------

def _shard_ids(r, parent: str) -> list[str]:
    n = int(r.hget(state.job_key(parent), "split_shards") or 0)
    return [shard_id(parent, k) for k in range(n)]


def aggregate(r, parent: str) -> dict:
    """Parent progress from its shards: done, failed and rows/s (of the shards running now)."""
    ids = _shard_ids(r, parent)
    with r.pipeline() as p:
        for sid in ids:
            p.hmget(state.job_key(sid), "status", "done", "failed", "rows_per_s")
        vals = p.execute()
    done = sum(int(float(v[1] or 0)) for v in vals)
    failed = sum(int(float(v[2] or 0)) for v in vals)
    rps = sum(float(v[3] or 0) for v in vals if v[0] == "running")
    return {"done": done, "failed": failed, "rows_per_s": round(rps, 3)}


class _ParentKeeper(threading.Thread):
    """While a shard runs: parent progress, parent heartbeat, and parent cancel -> shard cancel."""

    def __init__(self, r, parent: str, sid: str):
        super().__init__(name=f"parent-{parent}", daemon=True)
        self.r, self.parent, self.sid = r, parent, sid
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.tick()
            self.stop.wait(PROGRESS_S)

    def tick(self) -> None:
        try:
            prec = state.get(self.r, self.parent) or {}
            if prec.get("cancel_requested") or prec.get("status") == "cancelled":
                state.update(self.r, self.sid, cancel_requested=1)
                self.r.delete(state.heartbeat_key(self.parent))
                return
            if prec.get("status") == "running":
                self.r.set(state.heartbeat_key(self.parent), "split", ex=PARENT_HEARTBEAT_S)
                state.update(self.r, self.parent, **aggregate(self.r, self.parent))
        except Exception as e:  # noqa: BLE001 - progress is best effort; the shard must go on
            log.warning("parent %s progress: %s", self.parent, e)


def _run_shard(ctx, rec: dict, run_one: Callable[[], dict]) -> dict:
    r, sid, parent = ctx.redis, rec["id"], rec["parent"]
    prec = state.get(r, parent) or {}
    if prec.get("cancel_requested") or prec.get("status") == "cancelled":
        state.set_status(r, sid, "cancelled", error="parent job cancelled")
        return {"status": "cancelled"}
    keeper = _ParentKeeper(r, parent, sid)
    keeper.start()
    try:
        out = run_one()
    except Exception as e:
        state.set_status(r, parent, "failed", error=f"shard {sid} failed: {e}"[:2000])
        r.delete(state.heartbeat_key(parent))
        raise
    finally:
        keeper.stop.set()
        keeper.join(timeout=5)
    if out.get("status") == "succeeded":
        keeper.tick()
        with r.pipeline(transaction=True) as p:
            p.sadd(done_set(parent), sid)
            p.scard(done_set(parent))
            _, n_done = p.execute()
        if n_done >= len(_shard_ids(r, parent)):
            with job_context(parent):
                merge(ctx, state.get(r, parent))
    return out


# -- merging --------------------------------------------------------------------------------------

def merge(ctx, prec: dict) -> None:
    """Every shard succeeded: write the parent's results in input order, once."""
    r, job_id = ctx.redis, prec["id"]
    if prec["status"] == "succeeded":
        return
    store = open_store(prec.get("store_url") or None)
    plan = Plan.from_json(store.get_bytes(plan_key(job_id)))
    per_shard, workers = [], set()
    for sid, rows in plan.shards:
        srec = state.get(r, sid)
        workers.add(srec.get("worker") or "")
        got = res.decode_rows(store.get_bytes(srec["results_key"]), "jsonl")
        if len(got) != len(rows):
            raise RuntimeError(f"shard {sid} has {len(got)} results for {len(rows)} rows")
        per_shard.append(zip(rows, got))
    merged = merge_in_input_order(per_shard, plan.total)
    for i, row in enumerate(merged):
        row["row"] = i
    tmp = tempfile.mkdtemp(prefix="prefixq-merge-")
    try:
        if prec.get("kind") == "openai":
            local = os.path.join(tmp, "input.jsonl")
            store.get_file(prec["input_key"], local)
            endpoints = {x["index"]: x["endpoint"] for x in formats.iter_rows(local, "jsonl", "openai")
                         if x["endpoint"] != "/v1/chat/completions"}
            res.write_openai(store, prec["results_key"], prec["errors_key"], iter(merged), endpoints,
                             prec["model"], int(time.time()), tmp)
        else:
            res.write_native(store, prec["results_key"], iter(merged), prec["output_format"], tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_fail = sum(1 for x in merged if x["finish_reason"] == "error")
    started = float(prec.get("started_at") or time.time())
    elapsed = max(1e-6, time.time() - started)
    manifest = {
        "job_id": job_id, "status": "succeeded", "model": prec.get("model"), "input": prec["input_key"],
        "results": prec["results_key"], "errors": prec.get("errors_key") or None,
        "output_format": prec.get("output_format"), "kind": prec.get("kind"),
        "counts": {"total": plan.total, "succeeded": plan.total - n_fail, "failed": n_fail},
        "split": {"shards": [s for s, _ in plan.shards], "workers": sorted(workers - {""})},
        "timings": {"created_at": prec.get("created_at"), "started_at": started, "finished_at": time.time(),
                    "run_seconds": round(elapsed, 3), "rows_per_s": round(plan.total / elapsed, 3)},
    }
    store.put_bytes(prec["manifest_key"], json.dumps(manifest, indent=2).encode())
    state.set_status(r, job_id, "succeeded", done=plan.total - n_fail, failed=n_fail, error="",
                     rows_per_s=manifest["timings"]["rows_per_s"])
    r.delete(state.heartbeat_key(job_id))
    log.info("job %s: merged %d shards from %d workers", job_id, len(plan.shards), len(manifest["split"]["workers"]))
