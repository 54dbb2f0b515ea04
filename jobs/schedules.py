"""Recurring jobs: schedules stored in Redis, fired by rq's cron scheduler (`prefixq scheduler`).

Keys:
  prefixq:schedules                       hash  name -> Schedule JSON
  prefixq:schedule:<name>:fired:<period>  str   scheduler that fired the period (SET NX, 8 days)
  prefixq:schedule:<name>:runs            list  JSON run records, newest first (last 50)

rq's CronScheduler has no leader election, so two scheduler processes would both enqueue each
period. Each firing therefore first claims the period, the cron tick it belongs to, with SET NX:
only the claimant submits, whichever process wakes first.

The input is a template: `{date}` (YYYY-MM-DD of the period, scheduler's local time, as cron
uses), `{yesterday}`, `{period}` (the tick, ISO 8601). Store URLs may hold globs; every object
matched becomes one job.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

import redis
from croniter import croniter
from rq.cron import CronJob, CronScheduler

from jobs import inputs, state

log = logging.getLogger("prefixq.scheduler")

SCHEDULES = state.PREFIX + "schedules"
CLAIM_TTL_S = 8 * 86400
RUNS_KEPT = 50
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUBMIT_OPTIONS = ("model", "max_tokens", "temperature", "top_p", "output_format", "split_rows")


@dataclass
class Schedule:
    name: str
    cron: str
    input: str
    options: dict = field(default_factory=dict)  # Client.submit keyword arguments
    queue: str | None = None
    created_at: float = 0.0

    def validate(self) -> Schedule:
        if not _NAME.match(self.name):
            raise ValueError(f"invalid schedule name {self.name!r} (letters, digits, _ . -; up to 64)")
        if not croniter.is_valid(self.cron):
            raise ValueError(f"invalid cron expression {self.cron!r}")
        unknown = set(self.options) - set(SUBMIT_OPTIONS)
        if unknown:
            raise ValueError(f"unknown submit options {sorted(unknown)}")
        render_input(self.input, datetime.now(timezone.utc))  # unknown placeholders fail now, not at 2 am
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        return cls(**json.loads(text))


def render_input(template: str, period: datetime) -> str:
    local = period.astimezone()
    try:
        return template.format(date=local.strftime("%Y-%m-%d"),
                               yesterday=(local - timedelta(days=1)).strftime("%Y-%m-%d"),
                               period=local.strftime("%Y-%m-%dT%H-%M-%S"))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"bad input template {template!r}: use {{date}}, {{yesterday}} or {{period}} ({e})") from None


def claim_key(name: str, period: datetime) -> str:
    return f"{state.PREFIX}schedule:{name}:fired:{int(period.timestamp())}"


def runs_key(name: str) -> str:
    return f"{state.PREFIX}schedule:{name}:runs"


# -- management (CLI) ------------------------------------------------------------------------------

def add(r: redis.Redis, sched: Schedule, *, replace: bool = False) -> None:
    import time
    sched.created_at = sched.created_at or time.time()
    sched.validate()
    if replace:
        r.hset(SCHEDULES, sched.name, sched.to_json())
    elif not r.hsetnx(SCHEDULES, sched.name, sched.to_json()):
        raise ValueError(f"schedule {sched.name!r} exists (remove it first, or use --replace)")


def remove(r: redis.Redis, name: str) -> bool:
    return bool(r.hdel(SCHEDULES, name))


def list_all(r: redis.Redis) -> list[Schedule]:
    return [Schedule.from_json(v) for _, v in sorted(r.hgetall(SCHEDULES).items())]


def recent_runs(r: redis.Redis, name: str, limit: int = 10) -> list[dict]:
    return [json.loads(x) for x in r.lrange(runs_key(name), 0, limit - 1)]


def next_run(sched: Schedule, after: datetime | None = None) -> datetime:
    base = (after or datetime.now(timezone.utc)).astimezone().replace(tzinfo=None)
    return croniter(sched.cron, base).get_next(datetime).astimezone()


# -- firing ----------------------------------------------------------------------------------------

def fire(r: redis.Redis, sched: Schedule, period: datetime, *, redis_url: str, scheduler: str) -> list[str] | None:
    """Submit the schedule's jobs for `period` unless another scheduler already did.
    Returns the job ids, or None when the period was already claimed."""
    if not r.set(claim_key(sched.name, period), scheduler, nx=True, ex=CLAIM_TTL_S):
        log.info("schedule %s: period %s already fired elsewhere", sched.name, period.isoformat())
        return None
    from jobs.client import Client
    url = render_input(sched.input, period)
    run = {"period": period.isoformat(), "input": url, "scheduler": scheduler, "jobs": [], "error": ""}
    try:
        client = Client(redis_url=redis_url, queue=sched.queue)
        if inputs.is_store_url(url):
            run["jobs"] = inputs.submit_url(client, url, **sched.options)
        else:
            run["jobs"] = [inputs.submit_file(client, url, **sched.options)]
        log.info("schedule %s: period %s submitted %s", sched.name, period.isoformat(), run["jobs"])
    except Exception as e:  # noqa: BLE001 - a missing nightly file must not stop the scheduler
        run["error"] = f"{type(e).__name__}: {e}"
        log.error("schedule %s: period %s failed: %s", sched.name, period.isoformat(), run["error"])
    with r.pipeline() as p:
        p.lpush(runs_key(sched.name), json.dumps(run))
        p.ltrim(runs_key(sched.name), 0, RUNS_KEPT - 1)
        p.execute()
    return run["jobs"]


class ScheduleCronJob(CronJob):
    """An rq CronJob whose firing claims the period and submits through prefixq.

    rq's own `enqueue` would put a pickled call on the queue; prefixq's queue is JSON only,
    and the submit has to happen at most once per period anyway.
    """

    def __init__(self, sched: Schedule, redis_url: str, scheduler_name: str):
        super().__init__(queue_name=sched.queue or state.DEFAULT_QUEUE, func_name="jobs.schedules.fire",
                         cron=sched.cron, name=f"prefixq:{sched.name}")
        self.schedule, self.redis_url, self.scheduler_name = sched, redis_url, scheduler_name

    def enqueue(self, connection):  # called by CronScheduler.enqueue_jobs when the tick is due
        period = self.next_enqueue_time  # the tick itself, identical in every scheduler process
        assert period is not None
        fire(state.connect(self.redis_url), self.schedule, period, redis_url=self.redis_url,
             scheduler=self.scheduler_name)


class PrefixqScheduler(CronScheduler):
    """rq's CronScheduler, with its job list kept in step with the schedules hash in Redis."""

    def __init__(self, redis_url: str, name: str = ""):
        super().__init__(connection=redis.Redis.from_url(redis_url), name=name)
        self.redis_url = redis_url
        self.text = state.connect(redis_url)
        self._loaded: dict[str, str] = {}

    def sync(self) -> None:
        current = self.text.hgetall(SCHEDULES)
        if current == self._loaded:
            return
        keep = {j.schedule.name: j for j in self._cron_jobs
                if current.get(j.schedule.name) == self._loaded.get(j.schedule.name)}
        jobs = []
        for name, raw in sorted(current.items()):
            if name in keep:
                jobs.append(keep[name])
                continue
            try:
                jobs.append(ScheduleCronJob(Schedule.from_json(raw).validate(), self.redis_url, self.name))
                self.log.info("schedule %s loaded (%s)", name, jobs[-1].cron)
            except (ValueError, TypeError) as e:
                self.log.error("schedule %s is invalid, skipped: %s", name, e)
        self._cron_jobs = jobs
        self._loaded = current
        self.save()

    def run(self, stop: threading.Event, poll_s: float = 5.0) -> None:
        """rq's start() loop, plus re-reading the schedules at least every `poll_s` seconds."""
        self.register_birth()
        try:
            while not stop.is_set():
                self.sync()
                if self.enqueue_jobs():
                    self.save()
                self.heartbeat()
                stop.wait(min(self.calculate_sleep_interval(), poll_s))
        finally:
            self.register_death()
