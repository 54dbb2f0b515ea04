"""Job state in Redis.

Key layout (prefix `prefixq:`; see README "Redis keys"):

  prefixq:job:<id>             hash   the job record (fields below)
  prefixq:job:<id>:heartbeat   string worker name, EX 30 s, refreshed every 5 s while running
  prefixq:job:<id>:attempts    list   JSON reasons, one per attempt that ended abnormally
  prefixq:jobs                 zset   job id -> created_at (unix seconds), for `prefixq ls`
  prefixq:jobs:state:<status>  set    job ids by status (queued/running/succeeded/failed/cancelled/dead)
  prefixq:jobs:requeue         set    job ids put back to `queued` whose rq enqueue is not yet confirmed
  prefixq:reaper:lock          string the worker currently reaping (SET NX EX)
  rq:queue:<queue> etc.        rq 3.x keys; the rq job id equals the prefixq job id

Job hash fields: id, status, queue, model, store_url, input_key, input_format (jsonl|parquet),
kind (native|openai), output_format (parquet|jsonl), settings (JSON: job-level sampling
defaults), total, done, failed, created_at, started_at, finished_at, updated_at,
heartbeat_at (unix seconds, floats), error, attempts, worker, results_key, errors_key,
manifest_key, cancel_requested (0|1), rows_per_s, run_token (the uuid of the run that owns the job
while it is `running`; a run that finds another token has been superseded), paused (why a running
job is waiting, e.g. a store outage; empty otherwise).

`attempts` counts runs started. The `:attempts` list holds one JSON reason per run that ended
abnormally: kind `worker_lost` (heartbeat expired), `store_unavailable`, `error`, `drained`
(graceful stop: not a failure) or `manual_retry` (marks where `prefixq retry` reset the count).
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid

import redis

PREFIX = "prefixq:"
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "dead")
TERMINAL = ("succeeded", "failed", "cancelled", "dead")
FAILURE_KINDS = ("worker_lost", "store_unavailable", "error")
REQUEUE_SET = PREFIX + "jobs:requeue"
DEFAULT_QUEUE = "prefixq"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{3,63}$")
INT_FIELDS = ("total", "done", "failed", "attempts", "cancel_requested")
FLOAT_FIELDS = ("created_at", "started_at", "finished_at", "updated_at", "heartbeat_at", "rows_per_s")


def redis_url() -> str:
    return os.environ.get("PREFIXQ_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_retry_kwargs() -> dict:
    """Reconnect with backoff so a Redis restart (seconds) is absorbed by the client, not the job.
    PREFIXQ_REDIS_RETRIES attempts, backoff 0.1 s doubling to 5 s (about a minute in all)."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry
    n = int(os.environ.get("PREFIXQ_REDIS_RETRIES", "15"))
    return {"retry": Retry(ExponentialBackoff(cap=5.0, base=0.1), n),
            "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
            "socket_connect_timeout": 5, "health_check_interval": 30, "socket_keepalive": True}


def connect(url: str | None = None, decode: bool = True) -> redis.Redis:
    """Text connection (decode=True) for our keys; bytes (decode=False) for rq."""
    return redis.Redis.from_url(url or redis_url(), decode_responses=decode, **redis_retry_kwargs())


def bytes_twin(r: redis.Redis) -> redis.Redis:
    """A decode_responses=False connection to the same server (rq needs bytes)."""
    pool = r.connection_pool
    kw = {**pool.connection_kwargs, "decode_responses": False}
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kw))


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


def failures_since_retry(reasons: list[dict]) -> int:
    """Abnormal ends counted toward the dead-letter limit: those after the last manual retry."""
    n = 0
    for x in reasons:
        if x.get("kind") == "manual_retry":
            n = 0
        elif x.get("kind", "error") in FAILURE_KINDS:
            n += 1
    return n


def max_attempts() -> int:
    return max(1, int(os.environ.get("PREFIXQ_MAX_ATTEMPTS", "3")))


# Claim a job for one run: only if it is not finished and nobody live holds it. Atomic, so two
# workers that dequeue the same job (a requeue raced with a slow worker) cannot both run it.
_CLAIM = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'succeeded' or st == 'failed' or st == 'cancelled' or st == 'dead' then return st end
if st == 'running' and redis.call('EXISTS', KEYS[2]) == 1 then return 'held' end
local n = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') + 1
redis.call('HSET', KEYS[1], 'status', 'running', 'run_token', ARGV[1], 'worker', ARGV[2],
           'started_at', ARGV[3], 'updated_at', ARGV[3], 'heartbeat_at', ARGV[3], 'attempts', n,
           'error', '', 'paused', '')
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[4])
redis.call('SREM', KEYS[3], ARGV[5])
redis.call('SADD', KEYS[4], ARGV[5])
return 'ok:' .. n
"""

# Move a job out of `running` only if the caller still owns it (same run_token; '' matches any
# owner whose heartbeat has expired: the reaper's case).
_TRANSITION = """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'running' then return 0 end
local tok = redis.call('HGET', KEYS[1], 'run_token') or ''
if ARGV[1] == '' then
  if redis.call('EXISTS', KEYS[2]) == 1 or tok ~= ARGV[4] then return 0 end
elseif tok ~= ARGV[1] then return 0 end
local new = ARGV[2]
redis.call('HSET', KEYS[1], 'status', new, 'run_token', '', 'updated_at', ARGV[3], 'paused', '')
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[5] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[5]) end
for _, s in ipairs({'queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead'}) do
  if s ~= new then redis.call('SREM', KEYS[4] .. s, ARGV[6]) end
end
redis.call('SADD', KEYS[4] .. new, ARGV[6])
if new == 'queued' then redis.call('SADD', KEYS[5], ARGV[6]) end
return 1
"""


def claim(r: redis.Redis, job_id: str, token: str, worker: str, hb_ttl: int) -> tuple[str, int]:
    """Returns ('ok', attempt number) or (reason, 0): 'missing', 'held' or the terminal status."""
    keys = [job_key(job_id), heartbeat_key(job_id), state_set("queued"), state_set("running")]
    out = r.eval(_CLAIM, len(keys), *keys, token, worker, time.time(), hb_ttl, job_id)
    out = out.decode() if isinstance(out, bytes) else out
    if out.startswith("ok:"):
        return "ok", int(out[3:])
    return out, 0


def transition(r: redis.Redis, job_id: str, status: str, *, token: str = "", seen_token: str = "",
               reason: dict | None = None, **fields) -> bool:
    """Atomically move a running job to `status` if `token` still owns it, or, with token='',
    if its heartbeat has expired and its run_token is still `seen_token` (the reaper).
    Appends `reason` to the attempts list; a move to `queued` also marks it for (re)enqueue."""
    assert status in STATUSES, status
    if status in TERMINAL:
        fields.setdefault("finished_at", time.time())
    flat: list = []
    for k, v in fields.items():
        flat += [k, "" if v is None else (json.dumps(v) if isinstance(v, (dict, list)) else v)]
    keys = [job_key(job_id), heartbeat_key(job_id), attempts_key(job_id), PREFIX + "jobs:state:", REQUEUE_SET]
    return bool(r.eval(_TRANSITION, len(keys), *keys, token, status, time.time(), seen_token,
                       json.dumps(reason) if reason else "", job_id, *flat))


def owner_token(r: redis.Redis, job_id: str) -> str:
    return r.hget(job_key(job_id), "run_token") or ""
