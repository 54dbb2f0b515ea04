"""Result rows, shards, commit records and final assembly in the store.

Layout under jobs/<id>/ (deterministic, so a restarted job resumes):
  input.<jsonl|parquet>                the submitted file
  job.json                             the job record as submitted (for `prefixq recover`)
  shards/<seq:06d>.<parquet|jsonl>     result rows as they finish, with their `row` index (write-once)
  commits/<seq:06d>.json               commit record, written (write-once) after its shard:
                                       {"seq","shard","rows","ok","failed","row_ranges":[[a,b),...],
                                        "failed_ranges","attempt","worker","token","committed_at"}
  results.<parquet|jsonl>              final, one row per input row in input order (write-once)
  errors.jsonl                         OpenAI-format input only: the failed requests
  manifest.json                        counts, timings, model, settings, engine counters
A shard without a commit record is ignored (it may be half of a crashed attempt).

Two runs of one job may overlap (a worker reaped as dead that was only slow). Both shard and
commit keys are write-once, so a run that finds a seq taken moves on to the next one and never
overwrites another run's rows; a row committed twice is counted and assembled once (lowest seq
wins), so the final object has exactly one result per row whatever happened.
"""
from __future__ import annotations

import heapq
import io
import json
import os
import time
import uuid
from array import array
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from storage.base import AlreadyExists, Store

RESULT_SCHEMA = pa.schema([
    ("row", pa.int64()),
    ("custom_id", pa.string()),
    ("text", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("error", pa.string()),
    ("latency_ms", pa.float64()),
])
PUBLIC_COLUMNS = [f.name for f in RESULT_SCHEMA if f.name != "row"]


def shard_key(prefix: str, seq: int, ext: str) -> str:
    return f"{prefix}/shards/{seq:06d}.{ext}"


def commit_key(prefix: str, seq: int) -> str:
    return f"{prefix}/commits/{seq:06d}.json"


def _ranges(indices: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def encode_rows(rows: list[dict], ext: str) -> bytes:
    if ext == "parquet":
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), buf)
        return buf.getvalue()
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def decode_rows(data: bytes, ext: str) -> list[dict]:
    if ext == "parquet":
        return pq.read_table(io.BytesIO(data)).to_pylist()
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


class Committed:
    """What earlier attempts committed: a bitmap of done rows plus the commit records."""

    def __init__(self, total: int):
        self.done = bytearray(total)
        self.records: list[dict] = []
        self.next_seq = 0
        self.ok = 0
        self.failed = 0

    def count(self) -> int:
        return self.ok + self.failed


def _in_ranges(ranges: list[list[int]]) -> Callable[[int], bool]:
    import bisect
    starts = [a for a, _ in ranges]
    return lambda i: (k := bisect.bisect_right(starts, i) - 1) >= 0 and i < ranges[k][1]


def load_commits(store: Store, prefix: str, total: int) -> Committed:
    """Commit records in seq order, and which rows they cover; a row committed by two runs counts once."""
    c = Committed(total)
    for key in store.list(f"{prefix}/commits"):
        if key.endswith(".json"):
            c.records.append(json.loads(store.get_bytes(key)))
    c.records.sort(key=lambda r: r["seq"])
    for rec in c.records:
        c.next_seq = max(c.next_seq, int(rec["seq"]) + 1)
        failed = _in_ranges(rec.get("failed_ranges", []))
        for a, b in rec["row_ranges"]:
            for i in range(max(0, a), min(b, total)):
                if not c.done[i]:
                    c.done[i] = 1
                    if failed(i):
                        c.failed += 1
                    else:
                        c.ok += 1
    return c


def _no_retry(what: str, fn):
    return fn()


class ShardWriter:
    """Buffers finished rows and commits them as a shard plus a commit record.
    `retry(what, fn)` wraps every store call (the runner passes one that rides out outages)."""

    def __init__(self, store: Store, prefix: str, ext: str, next_seq: int, attempt: int, worker: str,
                 every_rows: int = 256, every_seconds: float = 10.0, retry=_no_retry):
        self.store, self.prefix, self.ext = store, prefix, ext
        self.seq = next_seq
        self.attempt, self.worker = attempt, worker
        self.every_rows, self.every_seconds = every_rows, every_seconds
        self.retry = retry
        self.buf: list[dict] = []
        self.last = time.monotonic()
        self.committed_rows = 0

    def add(self, row: dict) -> None:
        self.buf.append(row)

    def due(self) -> bool:
        return bool(self.buf) and (len(self.buf) >= self.every_rows or time.monotonic() - self.last >= self.every_seconds)

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.buf:
            return
        rows = sorted(self.buf, key=lambda r: r["row"])
        data = encode_rows(rows, self.ext)
        token = uuid.uuid4().hex
        failed_rows = [r["row"] for r in rows if r["finish_reason"] == "error"]
        while True:
            key = shard_key(self.prefix, self.seq, self.ext)
            if not self._put_once(key, data, None):
                self.seq += 1  # another run (or a half-done earlier one) holds this seq
                continue
            rec = {"seq": self.seq, "shard": key, "rows": len(rows), "ok": len(rows) - len(failed_rows),
                   "failed": len(failed_rows), "row_ranges": _ranges([r["row"] for r in rows]),
                   "failed_ranges": _ranges(failed_rows), "attempt": self.attempt, "worker": self.worker,
                   "token": token, "committed_at": time.time()}
            if self._put_once(commit_key(self.prefix, self.seq), json.dumps(rec).encode(), token):
                break
            self.seq += 1
        self.committed_rows += len(rows)
        self.seq += 1
        self.buf = []

    def _put_once(self, key: str, data: bytes, token: str | None) -> bool:
        """Write-once put. True if we wrote it, including when a retried request had in fact
        succeeded before (the commit record then carries our token)."""
        def put():
            try:
                self.store.put_bytes(key, data, if_none_match=True)
                return True
            except AlreadyExists:
                if token is None:
                    return self.store.get_bytes(key) == data
                return json.loads(self.store.get_bytes(key)).get("token") == token
        return self.retry(f"commit {key}", put)


def _iter_shard(path: str, ext: str) -> Iterator[dict]:
    if ext == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    else:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def _winning_rows(rows: Iterator[dict], seq: int, winner: array) -> Iterator[tuple[int, int, dict]]:
    for r in rows:
        i = r["row"]
        if 0 <= i < len(winner) and winner[i] == seq:
            yield i, seq, r


def assemble(store: Store, prefix: str, total: int, ext: str, tmpdir: str | None = None,
             retry=_no_retry) -> Iterator[dict]:
    """Stream all committed rows in input order, one per row (lowest seq wins).

    Memory stays bounded on million-row jobs: the winner of each row is an int32 array
    (4 bytes a row), shards are downloaded to `tmpdir` and merged row by row (each shard is sorted
    by row). Raises RuntimeError before yielding anything if some row has no committed result."""
    committed = retry("load commits", lambda: load_commits(store, prefix, total))
    missing = total - sum(committed.done)
    if missing:
        first = committed.done.index(0)
        raise RuntimeError(f"{missing} rows have no committed result (first: row {first})")
    winner = array("i", [-1]) * total
    for rec in committed.records:
        for a, b in rec["row_ranges"]:
            for i in range(max(0, a), min(b, total)):
                if winner[i] < 0:
                    winner[i] = int(rec["seq"])
    import tempfile
    own_tmp = tmpdir is None
    tmpdir = tmpdir or tempfile.mkdtemp(prefix="prefixq-assemble-")
    try:
        streams = []
        for rec in committed.records:
            seq, key = int(rec["seq"]), rec["shard"]
            path = os.path.join(tmpdir, f"shard-{seq:06d}")
            retry(f"download {key}", lambda k=key, p=path: store.get_file(k, p))
            streams.append(_winning_rows(_iter_shard(path, key.rsplit(".", 1)[-1]), seq, winner))
        for _row, _seq, r in heapq.merge(*streams, key=lambda t: t[0]):
            yield r
    finally:
        if own_tmp:
            import shutil
            shutil.rmtree(tmpdir, ignore_errors=True)


@dataclass
class Written:
    """What the final assembly wrote (or found already written by an earlier run)."""
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    already_existed: bool = False

    def count(self, r: dict) -> None:
        if r["finish_reason"] == "error":
            self.failed += 1
        else:
            self.ok += 1
            self.prompt_tokens += r["prompt_tokens"] or 0
        self.completion_tokens += r["completion_tokens"] or 0


def _put_file_once(store: Store, key: str, path: str, retry) -> bool:
    def put():
        try:
            store.put_file(key, path, if_none_match=True)
            return True
        except AlreadyExists:
            return False  # an earlier run of this job already assembled it; the first one stands
    return retry(f"put {key}", put)


def write_native(store: Store, key: str, rows: Iterator[dict], ext: str, tmpdir: str, retry=_no_retry) -> Written:
    """Stream rows (in input order) into a local file, then put it once (write-once)."""
    w = Written()
    path = os.path.join(tmpdir, "results." + ext)
    if ext == "parquet":
        schema = pa.schema([f for f in RESULT_SCHEMA if f.name != "row"])
        with pq.ParquetWriter(path, schema) as pw:
            batch: list[dict] = []
            for r in rows:
                w.count(r)
                batch.append({k: r.get(k) for k in PUBLIC_COLUMNS})
                if len(batch) >= 4096:
                    pw.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            pw.write_table(pa.Table.from_pylist(batch, schema=schema))
    else:
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                w.count(r)
                f.write(json.dumps({k: r.get(k) for k in PUBLIC_COLUMNS}, ensure_ascii=False) + "\n")
    w.already_existed = not _put_file_once(store, key, path, retry)
    return w


def write_openai(store: Store, key: str, errors_key: str, rows: Iterator[dict], endpoints: dict[int, str],
                 model: str, created: int, tmpdir: str, retry=_no_retry) -> Written:
    w = Written()
    ok_path, err_path = os.path.join(tmpdir, "results.jsonl"), os.path.join(tmpdir, "errors.jsonl")
    with open(ok_path, "w", encoding="utf-8") as ok_f, open(err_path, "w", encoding="utf-8") as err_f:
        for r in rows:
            w.count(r)
            rid = "batch_req_" + uuid.uuid5(uuid.NAMESPACE_URL, f"{key}#{r['row']}").hex
            req_id = uuid.uuid5(uuid.NAMESPACE_OID, f"{key}#{r['row']}").hex
            if r["finish_reason"] == "error":
                line = {"id": rid, "custom_id": r["custom_id"],
                        "response": {"status_code": 400, "request_id": req_id,
                                     "body": {"error": {"message": r["error"], "type": "invalid_request_error"}}},
                        "error": {"code": "invalid_request", "message": r["error"]}}
                err_f.write(json.dumps(line, ensure_ascii=False) + "\n")
                continue
            usage = {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                     "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}
            if endpoints.get(r["row"]) == "/v1/completions":
                body = {"id": "cmpl-" + req_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": 0, "text": r["text"], "logprobs": None,
                                     "finish_reason": r["finish_reason"]}], "usage": usage}
            else:
                body = {"id": "chatcmpl-" + req_id, "object": "chat.completion", "created": created, "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                                     "logprobs": None, "finish_reason": r["finish_reason"]}],
                        "usage": usage}
            ok_f.write(json.dumps({"id": rid, "custom_id": r["custom_id"],
                                   "response": {"status_code": 200, "request_id": req_id, "body": body},
                                   "error": None}, ensure_ascii=False) + "\n")
    # errors first: once results.jsonl exists the job is complete for readers
    _put_file_once(store, errors_key, err_path, retry)
    w.already_existed = not _put_file_once(store, key, ok_path, retry)
    return w
