"""`prefixq recover`: rebuild job state that Redis lost, from the store.

The store is the record of truth: submit writes `jobs/<id>/job.json` (the job record as created)
next to the input, runs write commit records, and the final results and manifest are write-once.
For every job.json whose job has no Redis record, recover re-creates the record: `succeeded`
(counts from the manifest) when results and manifest exist, else `queued` with the committed
row counts, and puts it back on the queue; the run then skips the committed rows.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from jobs import state
from jobs.client import enqueue_run
from storage.base import Store
from worker import results as res

_JOB_JSON = re.compile(r"^jobs/([A-Za-z0-9][A-Za-z0-9_-]{3,63})/job\.json$")
_KEEP = ("queue", "model", "store_url", "input_key", "input_format", "kind", "output_format", "settings",
         "total", "source_name", "results_key", "manifest_key", "errors_key", "created_at")


@dataclass
class Recovered:
    job_id: str
    status: str
    done: int
    failed: int


def recover(r, r_bytes, store: Store, dry_run: bool = False) -> list[Recovered]:
    out: list[Recovered] = []
    for key in store.list("jobs"):
        m = _JOB_JSON.match(key)
        if not m or state.get(r, m.group(1)) is not None:
            continue
        job_id = m.group(1)
        saved = json.loads(store.get_bytes(key))
        fields = {k: saved[k] for k in _KEEP if saved.get(k) not in (None, "")}
        prefix = state.job_prefix(job_id) + "/"
        if any(not str(fields.get(k, prefix)).startswith(prefix) for k in ("input_key", "results_key", "manifest_key")):
            raise ValueError(f"{key}: keys outside the job's prefix; not recovering it")
        total = int(fields.get("total", 0))
        if store.exists(fields["results_key"]) and store.exists(fields["manifest_key"]):
            counts = json.loads(store.get_bytes(fields["manifest_key"])).get("counts", {})
            rec = Recovered(job_id, "succeeded", int(counts.get("succeeded", 0)), int(counts.get("failed", 0)))
        else:
            c = res.load_commits(store, state.job_prefix(job_id), total)
            rec = Recovered(job_id, "queued", c.ok, c.failed)
        out.append(rec)
        if dry_run:
            continue
        state.create(r, job_id, {**fields, "status": rec.status, "done": rec.done, "failed": rec.failed,
                                 "recovered": 1})
        state.add_attempt_reason(r, job_id, {"kind": "recovered", "at": __import__("time").time(),
                                             "error": "job state rebuilt from the store by `prefixq recover`"})
        if rec.status == "queued":
            enqueue_run(r_bytes, fields.get("queue") or state.DEFAULT_QUEUE, job_id, f"{job_id}-recovered")
    return out
