"""Python client: submit / status / results / cancel, for other Python services."""
from __future__ import annotations

import json
import os
import shutil
import time

from rq import Queue
from rq.serializers import JSONSerializer

from jobs import formats, state
from storage import open_store
from storage.base import default_store_url

RQ_FUNC = "worker.runner.run_job"


def _rq_queue(r_bytes, name: str) -> Queue:
    return Queue(name, connection=r_bytes, serializer=JSONSerializer)


def enqueue_run(r_bytes, queue: str, job_id: str, rq_id: str | None = None, at_front: bool = False) -> None:
    """Put one run of a job on the rq queue. Requeues use a fresh rq id (`<id>-r<n>`) so rq's
    bookkeeping of the earlier run (started/finished/failed registries) cannot touch this one;
    the job id, the only argument, is what the worker runs. Requeues go to the front: the job
    was already admitted, and its committed rows are waiting for the rest."""
    _rq_queue(r_bytes, queue).enqueue(RQ_FUNC, job_id, job_id=rq_id or job_id, job_timeout=-1,
                                      result_ttl=86400, failure_ttl=7 * 86400, at_front=at_front,
                                      description=f"prefixq job {job_id}")


def flush_requeues(r_text, r_bytes, limit: int = 500) -> int:
    """Enqueue jobs that were moved back to `queued` (reaper, graceful stop, retry) and not yet
    confirmed on the rq queue. Enqueuing twice is harmless: only one run can claim the job."""
    n = 0
    for job_id in r_text.srandmember(state.REQUEUE_SET, limit) or []:
        rec = state.get(r_text, job_id)
        if rec is None or rec["status"] != "queued":
            r_text.srem(state.REQUEUE_SET, job_id)
            continue
        enqueue_run(r_bytes, rec.get("queue") or state.DEFAULT_QUEUE, job_id, f"{job_id}-r{rec.get('attempts', 0)}",
                    at_front=True)
        r_text.srem(state.REQUEUE_SET, job_id)
        n += 1
    return n


class Client:
    def __init__(self, redis_url: str | None = None, store_url: str | None = None, queue: str | None = None):
        self.redis_url = redis_url or state.redis_url()
        self.store_url = store_url or default_store_url()
        self.queue = queue or os.environ.get("PREFIXQ_QUEUE", state.DEFAULT_QUEUE)
        self.r = state.connect(self.redis_url)
        self._store = None

    @property
    def store(self):
        if self._store is None:
            self._store = open_store(self.store_url)
        return self._store

    def _rq(self):
        return _rq_queue(state.connect(self.redis_url, decode=False), self.queue)

    def submit(self, path: str, *, model: str | None = None, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None,
               output_format: str | None = None, job_id: str | None = None) -> str:
        """Validate `path` while streaming it, upload it, enqueue; return the job id.
        Raises formats.JobFileError (nothing is enqueued) on a file-level problem."""
        info = formats.validate_file(path)
        if info["kind"] == "openai":
            if output_format not in (None, "jsonl"):
                raise ValueError("OpenAI Batch input produces OpenAI JSONL output; --output-format must be jsonl")
            output_format = "jsonl"
        output_format = output_format or "parquet"
        if output_format not in ("parquet", "jsonl"):
            raise ValueError(f"unknown output format {output_format!r}")
        settings = {k: v for k, v in {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}.items()
                    if v is not None}
        job_id = state.validate_job_id(job_id) if job_id else state.new_job_id()
        ext = "parquet" if info["format"] == "parquet" else "jsonl"
        with open(path, "rb") as f:
            if info["format"] == "jsonl" and f.read(2) == formats.GZIP_MAGIC:
                ext += ".gz"  # stored as given; the worker decompresses it with the same limits
        input_key = f"{state.job_prefix(job_id)}/input.{ext}"
        self.store.put_file(input_key, path)
        state.create(self.r, job_id, {
            "queue": self.queue, "model": model or os.environ.get("PREFIXQ_MODEL", "smollm2"),
            "store_url": self.store.url, "input_key": input_key, "input_format": info["format"],
            "kind": info["kind"], "output_format": output_format, "settings": settings,
            "total": info["rows"], "source_name": os.path.basename(path),
            "results_key": f"{state.job_prefix(job_id)}/results.{output_format}",
            "manifest_key": f"{state.job_prefix(job_id)}/manifest.json",
            "errors_key": f"{state.job_prefix(job_id)}/errors.jsonl" if info["kind"] == "openai" else "",
        })
        self.store.put_bytes(f"{state.job_prefix(job_id)}/job.json", json.dumps(
            state.get(self.r, job_id), default=str).encode())  # lets `prefixq recover` rebuild it
        enqueue_run(self._rq().connection, self.queue, job_id)
        return job_id

    def status(self, job_id: str) -> dict:
        rec = state.get(self.r, job_id)
        if rec is None:
            raise KeyError(f"no such job {job_id!r}")
        rec["attempt_reasons"] = state.attempt_reasons(self.r, job_id)
        rec["heartbeat_alive"] = bool(self.r.exists(state.heartbeat_key(job_id)))
        return rec

    def list(self, limit: int = 20) -> list[dict]:
        return state.recent(self.r, limit)

    def cancel(self, job_id: str) -> bool:
        """Ask a job to stop. Queued jobs never start; running ones stop within ~1 s
        (rows already committed stay in the store). Returns False if already finished."""
        rec = self.status(job_id)
        if rec["status"] in state.TERMINAL:
            return False
        state.update(self.r, job_id, cancel_requested=1)
        if rec["status"] == "queued":
            try:
                from rq.job import Job
                Job.fetch(job_id, connection=self._rq().connection, serializer=JSONSerializer).cancel()
            except Exception:  # noqa: BLE001 - the job may already be gone from the queue
                pass
        state.set_status(self.r, job_id, "cancelled", error="cancelled by user")
        return True

    def retry(self, job_id: str) -> None:
        """Requeue a dead, failed or cancelled job by hand; rows already committed are kept,
        and the dead-letter count starts again from zero."""
        rec = self.status(job_id)
        if rec["status"] not in ("dead", "failed", "cancelled"):
            raise ValueError(f"job {job_id} is {rec['status']}; only dead, failed or cancelled jobs can be retried")
        state.add_attempt_reason(self.r, job_id, {"kind": "manual_retry", "at": time.time(),
                                                  "from_status": rec["status"]})
        state.set_status(self.r, job_id, "queued", cancel_requested=0, error="", finished_at="", run_token="")
        self.r.sadd(state.REQUEUE_SET, job_id)
        flush_requeues(self.r, self._rq().connection)

    def presign(self, job_id: str, expires: int = 3600) -> list[str]:
        """Presigned GET URLs (S3 stores only) for the job's results, errors and manifest."""
        rec = self.status(job_id)
        if rec["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} is {rec['status']}; results exist once it has succeeded")
        store = open_store(rec.get("store_url") or self.store_url)
        keys = [rec["results_key"]] + [k for k in (rec.get("errors_key"), rec.get("manifest_key")) if k]
        return [store.presign(k, expires) for k in keys if store.exists(k)]

    def result_uri(self, job_id: str) -> str:
        rec = self.status(job_id)
        return open_store(rec.get("store_url") or self.store_url).uri(rec["results_key"])

    def results(self, job_id: str, out: str | None = None) -> str:
        """Download the results object to `out` (default ./<id>-results.<ext>); return the path."""
        rec = self.status(job_id)
        if rec["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} is {rec['status']}; results exist once it has succeeded")
        store = open_store(rec.get("store_url") or self.store_url)
        out = out or f"{job_id}-results.{rec['output_format']}"
        tmp = out + ".part"
        store.get_file(rec["results_key"], tmp)
        shutil.move(tmp, out)
        if rec.get("errors_key") and store.exists(rec["errors_key"]):
            store.get_file(rec["errors_key"], out + ".errors.jsonl")
        return out

    def wait(self, job_id: str, *, progress: bool = True, poll: float = 0.5, timeout: float | None = None) -> dict:
        from tqdm import tqdm

        start = time.monotonic()
        rec = self.status(job_id)
        bar = tqdm(total=rec.get("total") or None, unit="row", desc=job_id, disable=not progress, dynamic_ncols=True)
        try:
            while True:
                rec = self.status(job_id)
                n = rec.get("done", 0) + rec.get("failed", 0)
                bar.set_postfix_str(f"{rec['status']} failed={rec.get('failed', 0)}", refresh=False)
                bar.update(n - bar.n)
                if rec["status"] in state.TERMINAL:
                    return rec
                if timeout is not None and time.monotonic() - start > timeout:
                    raise TimeoutError(f"job {job_id} still {rec['status']} after {timeout}s")
                time.sleep(poll)
        finally:
            bar.close()
