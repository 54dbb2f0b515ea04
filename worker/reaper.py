"""Find jobs whose worker died and put them back on the queue.

Every live worker runs a `Reaper` thread. Each pass takes a short Redis lock so only one worker
reaps at a time, then looks at every `running` job: if its heartbeat key has expired (the worker
was killed, preempted or lost its network), the job goes back to `queued` with a `worker_lost`
reason, or to `dead` once it has failed `max_attempts` times. The move is one atomic Redis script
that also checks the run token it saw, so a worker that finishes at the same moment wins cleanly.
rq itself would only notice after job_timeout + 60 s, and only during maintenance every 600 s.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from jobs import state
from jobs.client import flush_requeues

log = logging.getLogger("prefixq.reaper")
LOCK_KEY = state.PREFIX + "reaper:lock"


@dataclass
class ReaperConfig:
    interval_s: float = 5.0       # how often each worker tries to reap
    grace_s: float = 60.0         # a running job with no heartbeat for this long is reaped
    max_attempts: int = field(default_factory=state.max_attempts)


@dataclass
class Reaped:
    job_id: str
    status: str        # queued or dead
    failures: int
    silent_s: float    # seconds since the last heartbeat


class Reaper:
    def __init__(self, r_text, r_bytes, name: str, cfg: ReaperConfig | None = None):
        self.r, self.rb, self.name = r_text, r_bytes, name
        self.cfg = cfg or ReaperConfig()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reap_once(self) -> list[Reaped]:
        """One pass (no-op unless this worker gets the lock). Returns the jobs it moved."""
        ttl = max(1, int(self.cfg.interval_s * 2))
        if not self.r.set(LOCK_KEY, self.name, nx=True, ex=ttl):
            return []
        out: list[Reaped] = []
        try:
            now = time.time()
            for job_id in self.r.smembers(state.state_set("running")):
                if self.r.exists(state.heartbeat_key(job_id)):
                    continue
                rec = state.get(self.r, job_id)
                if rec is None or rec.get("status") != "running":
                    continue
                last = max(float(rec.get("heartbeat_at") or 0), float(rec.get("started_at") or 0))
                silent = now - last
                if silent < self.cfg.grace_s:
                    continue
                out += self._reap(job_id, rec, silent)
            flush_requeues(self.r, self.rb)
        finally:
            # release only our own lock (it may have expired and been taken by another worker)
            self.r.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                        1, LOCK_KEY, self.name)
        return out

    def _reap(self, job_id: str, rec: dict, silent: float) -> list[Reaped]:
        reasons = state.attempt_reasons(self.r, job_id)
        failures = state.failures_since_retry(reasons) + 1
        reason = {"kind": "worker_lost", "attempt": rec.get("attempts"), "worker": rec.get("worker"),
                  "at": time.time(), "error": f"worker {rec.get('worker')} stopped heartbeating "
                                              f"({silent:.0f}s without a heartbeat)"}
        dead = failures >= self.cfg.max_attempts
        status = "dead" if dead else "queued"
        fields = {"error": f"dead after {failures} failed attempts; last: {reason['error']}"} if dead else {}
        if not state.transition(self.r, job_id, status, seen_token=rec.get("run_token") or "", reason=reason,
                                **fields):
            return []  # the job moved on meanwhile (finished, or a new run claimed it)
        log.warning("job %s: %s; %s (failure %d of %d)", job_id, reason["error"],
                    "moved to dead-letter" if dead else "requeued", failures, self.cfg.max_attempts)
        return [Reaped(job_id, status, failures, silent)]

    # -- background thread --------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="prefixq-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            try:
                self.reap_once()
            except Exception as e:  # noqa: BLE001 - Redis down: try again next interval
                log.warning("reaper pass failed: %s", e)
