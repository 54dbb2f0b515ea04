"""Result rows, shards, commit records and final assembly in the store.

Layout under jobs/<id>/ (deterministic, so a restarted job resumes):
  input.<jsonl|parquet>                the submitted file
  shards/<seq:06d>.<parquet|jsonl>     result rows as they finish, with their `row` index
  commits/<seq:06d>.json               commit record, written (write-once) after its shard:
                                       {"seq","shard","rows","row_ranges":[[a,b),...],"attempt","worker","committed_at"}
  results.<parquet|jsonl>              final, one row per input row in input order (write-once)
  errors.jsonl                         OpenAI-format input only: the failed requests
  manifest.json                        counts, timings, model, settings, engine counters
A shard without a commit record is ignored (it may be half of a crashed attempt).
"""
from __future__ import annotations

import io
import json
import time
import uuid

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


def load_commits(store: Store, prefix: str, total: int) -> Committed:
    c = Committed(total)
    for key in store.list(f"{prefix}/commits"):
        if not key.endswith(".json"):
            continue
        rec = json.loads(store.get_bytes(key))
        c.records.append(rec)
        c.next_seq = max(c.next_seq, int(rec["seq"]) + 1)
        for a, b in rec["row_ranges"]:
            for i in range(a, min(b, total)):
                if not c.done[i]:
                    c.done[i] = 1
        c.ok += rec.get("ok", 0)
        c.failed += rec.get("failed", 0)
    c.records.sort(key=lambda r: r["seq"])
    return c


class ShardWriter:
    def __init__(self, store: Store, prefix: str, ext: str, next_seq: int, attempt: int, worker: str,
                 every_rows: int = 256, every_seconds: float = 10.0):
        self.store, self.prefix, self.ext = store, prefix, ext
        self.seq = next_seq
        self.attempt, self.worker = attempt, worker
        self.every_rows, self.every_seconds = every_rows, every_seconds
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
        key = shard_key(self.prefix, self.seq, self.ext)
        self.store.put_bytes(key, encode_rows(rows, self.ext))
        nfail = sum(1 for r in rows if r["finish_reason"] == "error")
        rec = {"seq": self.seq, "shard": key, "rows": len(rows), "ok": len(rows) - nfail, "failed": nfail,
               "row_ranges": _ranges([r["row"] for r in rows]), "attempt": self.attempt,
               "worker": self.worker, "committed_at": time.time()}
        try:
            self.store.put_bytes(commit_key(self.prefix, self.seq), json.dumps(rec).encode(), if_none_match=True)
        except AlreadyExists:
            # another attempt took this seq meanwhile: keep our rows under a fresh seq
            self.seq += 1
            return self.flush()
        self.committed_rows += len(rows)
        self.seq += 1
        self.buf = []


def assemble(store: Store, prefix: str, total: int, ext: str) -> list[dict]:
    """All committed rows, first commit wins per row, in input order. Raises if any row is missing."""
    committed = load_commits(store, prefix, total)
    rows: list[dict | None] = [None] * total
    for rec in committed.records:
        shard_ext = rec["shard"].rsplit(".", 1)[-1]
        for r in decode_rows(store.get_bytes(rec["shard"]), shard_ext):
            i = r["row"]
            if 0 <= i < total and rows[i] is None:
                rows[i] = r
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:
        raise RuntimeError(f"{len(missing)} rows have no committed result (first: row {missing[0]})")
    return rows  # type: ignore[return-value]


def write_native(store: Store, key: str, rows: list[dict], ext: str) -> None:
    public = [{k: r.get(k) for k in PUBLIC_COLUMNS} for r in rows]
    if ext == "parquet":
        schema = pa.schema([f for f in RESULT_SCHEMA if f.name != "row"])
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(public, schema=schema), buf)
        data = buf.getvalue()
    else:
        data = encode_rows(public, "jsonl")
    _put_once(store, key, data)


def _put_once(store: Store, key: str, data: bytes) -> None:
    try:
        store.put_bytes(key, data, if_none_match=True)
    except AlreadyExists:
        pass  # a previous run of this job already assembled it; the first one stands


def write_openai(store: Store, key: str, errors_key: str, rows: list[dict], endpoints: dict[int, str],
                 model: str, created: int) -> tuple[int, int]:
    ok_lines, err_lines = [], []
    for r in rows:
        rid = "batch_req_" + uuid.uuid5(uuid.NAMESPACE_URL, f"{key}#{r['row']}").hex
        req_id = uuid.uuid5(uuid.NAMESPACE_OID, f"{key}#{r['row']}").hex
        if r["finish_reason"] == "error":
            err_lines.append({"id": rid, "custom_id": r["custom_id"],
                              "response": {"status_code": 400, "request_id": req_id,
                                           "body": {"error": {"message": r["error"], "type": "invalid_request_error"}}},
                              "error": {"code": "invalid_request", "message": r["error"]}})
            continue
        usage = {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                 "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}
        if endpoints.get(r["row"]) == "/v1/completions":
            body = {"id": "cmpl-" + req_id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}],
                    "usage": usage}
        else:
            body = {"id": "chatcmpl-" + req_id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                                 "logprobs": None, "finish_reason": r["finish_reason"]}],
                    "usage": usage}
        ok_lines.append({"id": rid, "custom_id": r["custom_id"],
                         "response": {"status_code": 200, "request_id": req_id, "body": body}, "error": None})
    _put_once(store, key, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in ok_lines).encode())
    _put_once(store, errors_key, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in err_lines).encode())
    return len(ok_lines), len(err_lines)
