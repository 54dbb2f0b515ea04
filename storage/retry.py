"""Riding out store outages: our own retry with backoff around store calls.

botocore already retries each request (standard mode, PREFIXQ_S3_MAX_ATTEMPTS). On top of that a
job retries a failing shard commit, download or final put for up to `window_s` seconds
(PREFIXQ_STORE_OUTAGE_S, default 120): the job is *paused* (no rows lost, heartbeat still
beating), not failed. Only a longer outage raises `StoreUnavailable`, which the worker treats as
a failed attempt of the job (requeued; dead-lettered after PREFIXQ_MAX_ATTEMPTS).
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from storage.base import AlreadyExists, NotFound

log = logging.getLogger("prefixq.store")
T = TypeVar("T")


class StoreUnavailable(Exception):
    """The store kept failing for longer than the outage window."""


def is_transient(e: BaseException) -> bool:
    """Errors worth waiting out: network failures, timeouts, throttling and 5xx. Not: missing
    keys, write-once conflicts, access denied or bad requests (retrying cannot fix those)."""
    if isinstance(e, (AlreadyExists, NotFound, ValueError)):
        return False
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return isinstance(e, (OSError, TimeoutError))
    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = e.response.get("Error", {}).get("Code", "")
        return status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout", "Throttling",
                                                          "ServiceUnavailable", "InternalError")
    if isinstance(e, BotoCoreError):  # EndpointConnectionError, ReadTimeoutError, ConnectionClosedError...
        return True
    return isinstance(e, (ConnectionError, TimeoutError, OSError))


@dataclass
class OutageRetry:
    window_s: float = float(os.environ.get("PREFIXQ_STORE_OUTAGE_S", "120"))
    base_s: float = 0.5
    cap_s: float = 8.0
    on_pause: Callable[[str | None], None] | None = None  # called with a reason, then None on recovery
    paused_total_s: float = 0.0

    def __call__(self, what: str, fn: Callable[[], T]) -> T:
        start = time.monotonic()
        delay = self.base_s
        paused = False
        try:
            while True:
                try:
                    return fn()
                except Exception as e:  # noqa: BLE001 - classified just below
                    if not is_transient(e):
                        raise
                    waited = time.monotonic() - start
                    if waited >= self.window_s:
                        raise StoreUnavailable(f"store unavailable for {waited:.0f}s during {what}: "
                                               f"{type(e).__name__}") from e
                    if not paused:
                        paused = True
                        log.warning("store error during %s (%s); pausing the job for up to %.0fs",
                                    what, type(e).__name__, self.window_s)
                        if self.on_pause:
                            self.on_pause(f"store unavailable since {time.strftime('%H:%M:%S')}: {what}")
                    time.sleep(min(delay, max(0.0, self.window_s - waited)) * (0.5 + random.random() / 2))
                    delay = min(self.cap_s, delay * 2)
        finally:
            if paused:
                self.paused_total_s += time.monotonic() - start
                log.info("store back after %.1fs; job resumes", time.monotonic() - start)
                if self.on_pause:
                    self.on_pause(None)
