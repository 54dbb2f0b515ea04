"""The plain-Redis contract, version 1 (docs/redis-contract.md): key names, the submit spec,
and what the bridge does with one stream entry. Nothing here needs rq or Python on the
producer's side; any Redis client can XADD a spec and read the replies and status.

Keys (all under `prefixq:v1:`):
  submit                       stream  XADD * spec '<json>'           (producers)
  submit, group `bridge`       consumer group read by every worker's bridge
  requests:<client_id>         hash    request_id -> job id           (idempotency, lookup)
  replies:<client_id>          stream  request_id, job_id, status accepted|rejected, error
  status:<job_id>              hash    version, job_id, client_id, request_id, status, total,
                                       done, failed, error, results_url, errors_url,
                                       manifest_url, updated_at
  tracked                      set     job ids whose status hash is still being refreshed
  dead                         stream  entries that could not be accepted, with the error
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field

from jobs import formats, inputs, state

VERSION = 1
NS = f"{state.PREFIX}v{VERSION}:"
SUBMIT_STREAM = NS + "submit"
GROUP = "bridge"
TRACKED = NS + "tracked"
DEAD_STREAM = NS + "dead"
REPLIES_MAXLEN = 10_000
STATUS_TTL_S = 7 * 86400
_TOKEN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
OPTIONS = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "output_format": str,
           "split_rows": int}
STATUS_FIELDS = ("status", "total", "done", "failed", "error")


def requests_key(client_id: str) -> str:
    return f"{NS}requests:{client_id}"


def replies_key(client_id: str) -> str:
    return f"{NS}replies:{client_id}"


def status_key(job_id: str) -> str:
    return f"{NS}status:{state.validate_job_id(job_id)}"


class SpecError(ValueError):
    pass


@dataclass
class Spec:
    request_id: str
    client_id: str = "default"
    input_url: str | None = None
    rows: list | None = None
    model: str | None = None
    options: dict = field(default_factory=dict)


def parse_spec(fields: dict) -> Spec:
    """Validate one stream entry's fields. Raises SpecError with a message for the reply."""
    raw = fields.get("spec")
    if raw is None:
        raise SpecError("entry has no 'spec' field")
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise SpecError(f"spec is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise SpecError("spec must be a JSON object")
    if d.get("version", VERSION) != VERSION:
        raise SpecError(f"unsupported spec version {d.get('version')!r} (this bridge speaks {VERSION})")
    unknown = set(d) - {"version", "request_id", "client_id", "input", "model", "options"}
    if unknown:
        raise SpecError(f"unknown spec fields {sorted(unknown)}")
    spec = Spec(request_id=d.get("request_id"), client_id=d.get("client_id", "default"), model=d.get("model"))
    for name in ("request_id", "client_id"):
        v = getattr(spec, name)
        if not isinstance(v, str) or not _TOKEN.match(v):
            raise SpecError(f"{name} must be 1-128 characters of letters, digits, . _ : -")
    if spec.model is not None and not isinstance(spec.model, str):
        raise SpecError("model must be a string")
    inp = d.get("input")
    if not isinstance(inp, dict) or len(inp) != 1 or not ({"url"} >= set(inp) or {"rows"} >= set(inp)):
        raise SpecError('input must be {"url": "s3://bucket/key"} or {"rows": [...]}')
    if "url" in inp:
        if not isinstance(inp["url"], str) or not inputs.is_store_url(inp["url"]):
            raise SpecError("input.url must be a store URL (s3://bucket/key or file:///path)")
        spec.input_url = inp["url"]
    else:
        if not isinstance(inp["rows"], list) or not inp["rows"]:
            raise SpecError("input.rows must be a non-empty list of job rows")
        spec.rows = inp["rows"]
    opts = d.get("options") or {}
    if not isinstance(opts, dict):
        raise SpecError("options must be an object")
    for k, v in opts.items():
        if k not in OPTIONS:
            raise SpecError(f"unknown option {k!r} (known: {', '.join(OPTIONS)})")
        if isinstance(v, bool) or not isinstance(v, OPTIONS[k]):
            raise SpecError(f"option {k!r} has the wrong type")
    spec.options = opts
    return spec


def submit_spec(client, spec: Spec, job_id: str) -> str:
    """Submit the job under `job_id`. Raises SpecError for input the job cannot run on."""
    opts = dict(spec.options)
    split_rows = opts.pop("split_rows", None)
    try:
        if spec.rows is not None:
            with tempfile.TemporaryDirectory(prefix="prefixq-v1-") as d:
                path = os.path.join(d, f"{spec.request_id.replace(':', '_')}.jsonl")
                with open(path, "w", encoding="utf-8") as f:
                    for row in spec.rows:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                return inputs.submit_file(client, path, split_rows=split_rows, job_id=job_id, model=spec.model, **opts)
        objs = inputs.expand(spec.input_url)
        if len(objs) != 1:
            raise SpecError(f"input.url names {len(objs)} objects; one request is one job")
        with inputs.fetched(objs[0]) as path:
            return inputs.submit_file(client, path, split_rows=split_rows, job_id=job_id, model=spec.model, **opts)
    except (formats.JobFileError, FileNotFoundError, ValueError) as e:
        if isinstance(e, SpecError):
            raise
        raise SpecError(str(e)) from None


def refresh_status(r, job_id: str, meta: dict | None = None) -> str | None:
    """Copy the job record into its v1 status hash; returns the status (None: no such job)."""
    rec = r.hgetall(state.job_key(job_id))
    if not rec:
        return None
    base = (rec.get("store_url") or "").rstrip("/")
    out = {k: rec.get(k, "") for k in STATUS_FIELDS}
    out.update(version=VERSION, job_id=job_id, updated_at=time.time(),
               results_url=f"{base}/{rec['results_key']}" if rec.get("results_key") else "",
               errors_url=f"{base}/{rec['errors_key']}" if rec.get("errors_key") else "",
               manifest_url=f"{base}/{rec['manifest_key']}" if rec.get("manifest_key") else "")
    out.update(meta or {})
    with r.pipeline() as p:
        p.hset(status_key(job_id), mapping=out)
        if out["status"] in state.TERMINAL:
            p.srem(TRACKED, job_id)
            p.expire(status_key(job_id), STATUS_TTL_S)
        else:
            p.sadd(TRACKED, job_id)
        p.execute()
    return out["status"]


def handle_entry(r, client, entry_id: str, fields: dict) -> dict:
    """Process one submit entry, idempotently (a redelivered entry maps to the same job).
    Returns the reply written to the client's reply stream."""
    try:
        spec = parse_spec(fields)
    except SpecError as e:
        r.xadd(DEAD_STREAM, {"entry": entry_id, "error": str(e), **{k: str(v) for k, v in fields.items()}},
               maxlen=REPLIES_MAXLEN, approximate=True)
        cid = _client_id_of(fields)
        reply = {"request_id": _request_id_of(fields), "job_id": "", "status": "rejected", "error": str(e)}
        if cid:
            r.xadd(replies_key(cid), reply, maxlen=REPLIES_MAXLEN, approximate=True)
        return reply
    req_key = requests_key(spec.client_id)
    job_id = state.new_job_id()
    if not r.hsetnx(req_key, spec.request_id, job_id):
        job_id = r.hget(req_key, spec.request_id)
    meta = {"client_id": spec.client_id, "request_id": spec.request_id}
    reply = {"request_id": spec.request_id, "job_id": job_id, "status": "accepted", "error": ""}
    if state.get(r, job_id) is None:  # not submitted yet (a first delivery, or a crash before)
        try:
            submit_spec(client, spec, job_id)
        except SpecError as e:
            r.hdel(req_key, spec.request_id)
            r.xadd(DEAD_STREAM, {"entry": entry_id, "error": str(e), "spec": fields.get("spec", "")},
                   maxlen=REPLIES_MAXLEN, approximate=True)
            reply = {"request_id": spec.request_id, "job_id": "", "status": "rejected", "error": str(e)}
    if reply["status"] == "accepted":
        refresh_status(r, job_id, meta)
    r.xadd(replies_key(spec.client_id), reply, maxlen=REPLIES_MAXLEN, approximate=True)
    return reply


def _client_id_of(fields: dict) -> str | None:
    try:
        cid = json.loads(fields.get("spec", "")).get("client_id", "default")
    except (ValueError, AttributeError):
        return None
    return cid if isinstance(cid, str) and _TOKEN.match(cid) else None


def _request_id_of(fields: dict) -> str:
    try:
        rid = json.loads(fields.get("spec", "")).get("request_id", "")
    except (ValueError, AttributeError):
        return ""
    return rid if isinstance(rid, str) else ""
