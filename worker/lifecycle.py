"""Worker lifecycle: our signal handling over rq's, and a work loop that survives Redis restarts.

rq's worker installs its own SIGTERM/SIGINT handlers when `work()` starts: a warm shutdown
that waits for the whole job (hours, for a big batch job) and then a cold one that raises
SystemExit from wherever the main thread is. Neither fits: Kubernetes gives a grace period of
~30 s. `PrefixqWorker` replaces them:

- first SIGTERM/SIGINT: set `ctx.stop_event`; the running job stops admitting rows, lets the
  in-flight ones finish for up to `ctx.drain_seconds`, commits its shard and puts itself back on
  the queue (not a failed attempt); the worker then exits 0. When idle, it exits at once.
- second signal: exit immediately (status 143). Committed shards stay in the store, the heartbeat
  expires, and a reaper requeues the job, which resumes from its commits.
"""
from __future__ import annotations

import logging
import os
import signal

import redis
from rq import SimpleWorker
from rq.exceptions import StopRequested

log = logging.getLogger("prefixq.worker")


class PrefixqWorker(SimpleWorker):
    stop_event = None  # threading.Event shared with the job runner (set by run_worker)

    def _install_signal_handlers(self):
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.stop_event is not None and self.stop_event.is_set():
            log.warning("second signal %s: exiting now; the job resumes elsewhere from its committed shards",
                        signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signal.SIGTERM)
        log.info("signal %s: stopping (in-flight rows may finish; send again to exit at once)",
                 signal.Signals(signum).name)
        if self.stop_event is not None:
            self.stop_event.set()
        self._stop_requested = True
        if self.get_state() != "busy":
            raise StopRequested()  # idle: interrupts the blocking dequeue


def work_forever(make_worker, burst: bool, stop_event, max_backoff_s: float = 30.0) -> int:
    """Run rq's loop; if it ends because Redis went away (rq quits on some connection errors),
    wait with backoff and start a new rq worker, until a stop is requested or a burst run ends."""
    backoff = 1.0
    while True:
        w = make_worker()
        try:
            w.work(burst=burst, logging_level="INFO", with_scheduler=False)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            log.warning("redis unavailable (%s); reconnecting in %.0fs", e, backoff)
        else:
            if stop_event.is_set() or burst:
                return 0
            # rq quits its loop on an unexpected error, e.g. Redis vanishing mid-bookkeeping
            log.warning("worker loop ended unexpectedly; restarting it in %.0fs", backoff)
        if stop_event.is_set():
            return 0
        stop_event.wait(backoff)
        backoff = min(max_backoff_s, backoff * 2)

