"""The bridge every worker runs beside its jobs: reads `prefixq:v1:submit` as consumer group
`bridge`, turns each spec into a normal job (jobs.redis_contract), and keeps the v1 status
hashes of tracked jobs fresh.

Delivery: an entry is XACKed only after its reply is written. Entries of a consumer that died
before acking are taken over with XAUTOCLAIM once idle for `claim_idle_s`; handling is
idempotent through the client's request map, so a takeover never submits a job twice.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis

from jobs import redis_contract as rc
from jobs import state

log = logging.getLogger("prefixq.bridge")


@dataclass
class BridgeConfig:
    block_ms: int = 1000          # XREADGROUP BLOCK
    batch: int = 10               # entries per read
    claim_idle_s: float = 60.0    # pending this long with a silent consumer: take it over
    claim_every_s: float = 15.0
    status_every_s: float = 1.0


class Bridge:
    def __init__(self, redis_url: str, *, queue: str | None = None, consumer: str, store_url: str | None = None,
                 cfg: BridgeConfig | None = None):
        from jobs.client import Client
        self.r = state.connect(redis_url)
        self.client = Client(redis_url=redis_url, store_url=store_url, queue=queue)
        self.consumer, self.cfg = consumer, cfg or BridgeConfig()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_claim = self._last_status = 0.0

    def ensure_group(self) -> None:
        try:  # id 0: entries XADDed before the first bridge started are read too
            self.r.xgroup_create(rc.SUBMIT_STREAM, rc.GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _handle(self, entries) -> int:
        n = 0
        for entry_id, fields in entries:
            if fields is None:  # trimmed from the stream while pending
                self.r.xack(rc.SUBMIT_STREAM, rc.GROUP, entry_id)
                continue
            reply = rc.handle_entry(self.r, self.client, entry_id, fields)
            log.info("v1 request %s -> %s %s", reply["request_id"], reply["status"], reply["job_id"] or reply["error"],
                     extra={"job_id": reply["job_id"]} if reply["job_id"] else None)
            self.r.xack(rc.SUBMIT_STREAM, rc.GROUP, entry_id)
            n += 1
        return n

    def poll_once(self) -> int:
        """Read and handle new entries (blocking up to block_ms); claim stale ones; refresh status."""
        now = time.monotonic()
        n = 0
        if now - self._last_claim >= self.cfg.claim_every_s:
            self._last_claim = now
            # our own unacked entries first (we restarted under the same name), then other consumers'
            for _, fields_list in self.r.xreadgroup(rc.GROUP, self.consumer, {rc.SUBMIT_STREAM: "0"},
                                                    count=self.cfg.batch) or []:
                n += self._handle(fields_list)
            _next, claimed, *_ = self.r.xautoclaim(rc.SUBMIT_STREAM, rc.GROUP, self.consumer,
                                                   int(self.cfg.claim_idle_s * 1000), "0-0", count=self.cfg.batch)
            if claimed:
                log.warning("took over %d submit entries from a silent consumer", len(claimed))
                n += self._handle(claimed)
        for _, entries in self.r.xreadgroup(rc.GROUP, self.consumer, {rc.SUBMIT_STREAM: ">"},
                                            count=self.cfg.batch, block=self.cfg.block_ms) or []:
            n += self._handle(entries)
        if time.monotonic() - self._last_status >= self.cfg.status_every_s:
            self._last_status = time.monotonic()
            self.refresh_tracked()
        return n

    def refresh_tracked(self) -> None:
        # one bridge per second is enough; the others skip
        if not self.r.set(rc.NS + "status-lock", self.consumer, nx=True, px=int(self.cfg.status_every_s * 900)):
            return
        for job_id in self.r.smembers(rc.TRACKED):
            if rc.refresh_status(self.r, job_id) is None:
                self.r.srem(rc.TRACKED, job_id)

    def _loop(self) -> None:
        self.ensure_group()
        while not self._stop.is_set():
            try:
                self.poll_once()
            except redis.ConnectionError as e:
                log.warning("bridge: redis unavailable (%s); retrying", e)
                self._stop.wait(1.0)
            except Exception:  # noqa: BLE001 - the bridge must outlive any one bad entry or bug
                log.exception("bridge: poll failed")
                self._stop.wait(1.0)

    def start(self) -> Bridge:
        self._thread = threading.Thread(target=self._loop, name="prefixq-bridge", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.block_ms / 1000 + 5)
