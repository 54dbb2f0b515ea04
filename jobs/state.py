"""Job state in Redis.

Key layout (prefix `prefixq:`; see README "Redis keys"):

  prefixq:job:<id>             hash   the job record (fields below)
  prefixq:job:<id>:heartbeat   string worker name, EX 30 s, refreshed every 5 s while running
  prefixq:job:<id>:attempts    list   JSON reasons, one per attempt that ended abnormally
  prefixq:jobs                 zset   job id -> created_at (unix seconds), for `prefixq ls`
  prefixq:jobs:state:<status>  set    job ids by status (queued/running/succeeded/failed/cancelled)
  rq:queue:<queue> etc.        rq 3.x keys; the rq job id equals the prefixq job id

Job hash fields: id, status, queue, model, store_url, input_key, input_format (jsonl|parquet),
kind (native|openai), output_format (parquet|jsonl), settings (JSON: job-level sampling
defaults), total, done, failed, created_at, started_at, finished_at, updated_at,
heartbeat_at (unix seconds, floats), error, attempts, worker, results_key, errors_key,
manifest_key, cancel_requested (0|1), rows_per_s.
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid

import redis

PREFIX = "prefixq:"
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_QUEUE = "prefixq"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{3,63}$")
INT_FIELDS = ("total", "done", "failed", "attempts", "cancel_requested")
FLOAT_FIELDS = ("created_at", "started_at", "finished_at", "updated_at", "heartbeat_at", "rows_per_s")


def redis_url() -> str:
    return os.environ.get("PREFIXQ_REDIS_URL", "redis://127.0.0.1:6379/0")


def connect(url: str | None = None) -> redis.Redis:
    return redis.Redis.from_url(url or redis_url(), decode_responses=True,
                                health_check_interval=30, socket_keepalive=True)


def new_job_id() -> str:
    return "j" + time.strftime("%y%m%d") + "-" + uuid.uuid4().hex[:12]


def validate_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _ID.match(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return job_id


def job_key(job_id: str) -> str:
    return PREFIX + "job:" + validate_job_id(job_id)


def heartbeat_key(job_id: str) -> str:
    return job_key(job_id) + ":heartbeat"


def attempts_key(job_id: str) -> str:
    return job_key(job_id) + ":attempts"


def state_set(status: str) -> str:
    return PREFIX + "jobs:state:" + status


def _decode(h: dict) -> dict:
    out = dict(h)
    for k in INT_FIELDS:
        if k in out and out[k] != "":
            out[k] = int(float(out[k]))
    for k in FLOAT_FIELDS:
        if k in out and out[k] != "":
            out[k] = float(out[k])
    if "settings" in out:
        try:
            out["settings"] = json.loads(out["settings"])
        except (TypeError, ValueError):
            pass
    return out


def create(r: redis.Redis, job_id: str, fields: dict) -> None:
    now = time.time()
    rec = {"id": job_id, "status": "queued", "total": 0, "done": 0, "failed": 0, "attempts": 0,
           "cancel_requested": 0, "created_at": now, "updated_at": now, "error": ""}
    rec.update(fields)
    rec = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in rec.items() if v is not None}
    with r.pipeline() as p:
        p.hset(job_key(job_id), mapping=rec)
        p.zadd(PREFIX + "jobs", {job_id: now})
        p.sadd(state_set(rec["status"]), job_id)
        p.execute()


def get(r: redis.Redis, job_id: str) -> dict | None:
    h = r.hgetall(job_key(job_id))
    return _decode(h) if h else None


def update(r: redis.Redis, job_id: str, **fields) -> None:
    fields["updated_at"] = time.time()
    r.hset(job_key(job_id), mapping={k: (json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v))
                                     for k, v in fields.items()})


def set_status(r: redis.Redis, job_id: str, status: str, **fields) -> None:
    assert status in STATUSES, status
    fields["status"] = status
    fields["updated_at"] = time.time()
    if status in TERMINAL:
        fields.setdefault("finished_at", time.time())
    with r.pipeline() as p:
        p.hset(job_key(job_id), mapping={k: ("" if v is None else v) for k, v in fields.items()})
        for s in STATUSES:
            if s != status:
                p.srem(state_set(s), job_id)
        p.sadd(state_set(status), job_id)
        p.execute()


def counts_by_state(r: redis.Redis) -> dict[str, int]:
    with r.pipeline() as p:
        for s in STATUSES:
            p.scard(state_set(s))
        return dict(zip(STATUSES, p.execute()))


def recent(r: redis.Redis, limit: int = 20) -> list[dict]:
    ids = r.zrevrange(PREFIX + "jobs", 0, limit - 1)
    with r.pipeline() as p:
        for i in ids:
            p.hgetall(job_key(i))
        return [_decode(h) for h in p.execute() if h]


def add_attempt_reason(r: redis.Redis, job_id: str, reason: dict) -> None:
    r.rpush(attempts_key(job_id), json.dumps(reason))


def attempt_reasons(r: redis.Redis, job_id: str) -> list[dict]:
    return [json.loads(x) for x in r.lrange(attempts_key(job_id), 0, -1)]


def job_prefix(job_id: str) -> str:
    return "jobs/" + validate_job_id(job_id)
