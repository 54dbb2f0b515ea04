"""Job input files: JSONL, Parquet, and OpenAI Batch API lines.

Everything here streams: files are read line by line (JSONL) or batch by batch
(Parquet), so validating a million-row file needs bounded memory. Duplicate
`custom_id`s are found with a set of 8-byte digests (~70 bytes a row in CPython).

File-level problems raise `JobFileError` naming the file, the line/row (1-based)
and the field. Row-level problems (prompt too long for the model, invalid
sampling values such as a negative temperature) are *not* checked here: they
fail only that row at run time and the error goes into the results.

Unknown fields are ignored (documented in the README): they are neither validated nor kept
in the results.

Compressed input: `.jsonl.gz` (any JSONL file starting with the gzip magic bytes) is read
through a decompressor that refuses more than PREFIXQ_MAX_INPUT_BYTES decompressed bytes
(default 16 GiB), so a gzip bomb fails at submit with a clear file-level error. A single line
longer than PREFIXQ_MAX_LINE_BYTES (default 64 MiB) is refused too, instead of being read into memory.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from typing import Iterator

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
OPENAI_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
JSONL_EXTS = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
GZIP_MAGIC = b"\x1f\x8b"


def max_input_bytes() -> int:
    return int(os.environ.get("PREFIXQ_MAX_INPUT_BYTES", str(16 << 30)))


def max_line_bytes() -> int:
    return int(os.environ.get("PREFIXQ_MAX_LINE_BYTES", str(64 << 20)))
PARQUET_EXTS = (".parquet", ".pq")


class JobFileError(ValueError):
    def __init__(self, file: str, msg: str, row: int | None = None, field: str | None = None, unit: str = "row"):
        self.file, self.row, self.field, self.msg = file, row, field, msg
        where = os.path.basename(file)
        if row is not None:
            where += f": {unit} {row}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {msg}")


def detect_format(path: str) -> str:
    low = path.lower()
    if low.endswith(PARQUET_EXTS):
        return "parquet"
    if low.endswith(JSONL_EXTS):
        return "jsonl"
    raise JobFileError(path, "unknown file format (expected .jsonl, .ndjson, .json, .jsonl.gz or .parquet)")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_params(src: dict, err, names=SAMPLING_FIELDS) -> dict:
    """Type checks only (file-level). Value checks happen per row at run time."""
    out = {}
    for name in names:
        v = src.get(name)
        if v is None:
            continue
        if name in ("max_tokens", "top_k", "seed"):
            if isinstance(v, float) and v.is_integer():
                v = int(v)  # Parquet/pandas often widen ints to float
            if not _is_int(v):
                err(name, f"must be an integer, got {type(v).__name__}")
        elif name in ("temperature", "top_p"):
            if not _is_num(v):
                err(name, f"must be a number, got {type(v).__name__}")
            try:
                v = float(v)
            except OverflowError:  # a JSON integer with hundreds of digits
                err(name, "is too large for a number")
        elif name == "stop":
            if isinstance(v, str):
                v = [v]
            elif isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v):
                v = list(v)
            else:
                err(name, "must be a string or a list of strings")
        out[name] = v
    return out


def _content_text(content, err, field):
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                err(field, "only text content parts are supported")
        return "".join(parts)
    err(field, f"must be a string, got {type(content).__name__}")


def _check_messages(msgs, err, field="messages") -> list[dict]:
    if not isinstance(msgs, (list, tuple)) or not msgs:
        err(field, "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            err(f"{field}[{i}]", "must be an object with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            err(f"{field}[{i}].role", "must be a non-empty string")
        content = _content_text(m.get("content"), err, f"{field}[{i}].content")
        out.append({"role": role, "content": content})
    return out


def normalize_native(obj, err) -> dict:
    if not isinstance(obj, dict):
        err(None, f"must be a JSON object, got {type(obj).__name__}")
    cid = obj.get("custom_id")
    if cid is None:
        err("custom_id", "missing")
    if isinstance(cid, int) and not isinstance(cid, bool):
        cid = str(cid)
    if not isinstance(cid, str) or not cid:
        err("custom_id", f"must be a non-empty string, got {type(cid).__name__}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is None and messages is None:
        err("prompt", "row has neither 'prompt' nor 'messages'")
    if prompt is not None and messages is not None:
        err("prompt", "row has both 'prompt' and 'messages'; give one")
    if prompt is not None and not isinstance(prompt, str):
        err("prompt", f"must be a string, got {type(prompt).__name__}")
    if messages is not None:
        messages = _check_messages(messages, err)
    return {"custom_id": cid, "prompt": prompt, "messages": messages,
            "params": _check_params(obj, err), "endpoint": None}


def normalize_openai(obj, err) -> dict:
    if not isinstance(obj, dict):
        err(None, f"must be a JSON object, got {type(obj).__name__}")
    cid = obj.get("custom_id")
    if cid is None:
        err("custom_id", "missing")
    if not isinstance(cid, str) or not cid:
        err("custom_id", f"must be a non-empty string, got {type(cid).__name__}")
    method = obj.get("method", "POST")
    if method != "POST":
        err("method", f"must be 'POST', got {method!r}")
    url = obj.get("url")
    if url not in OPENAI_ENDPOINTS:
        err("url", f"must be one of {', '.join(OPENAI_ENDPOINTS)}, got {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        err("body", "missing or not an object")
    prompt = messages = None
    if url == "/v1/chat/completions":
        if "messages" not in body:
            err("body.messages", "missing")
        messages = _check_messages(body["messages"], err, "body.messages")
    else:
        prompt = body.get("prompt")
        if prompt is None:
            err("body.prompt", "missing")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            err("body.prompt", f"must be a string, got {type(prompt).__name__}")
    src = dict(body)
    if src.get("max_tokens") is None and src.get("max_completion_tokens") is not None:
        src["max_tokens"] = src["max_completion_tokens"]
    params = _check_params(src, lambda f, m: err(f"body.{f}", m))
    return {"custom_id": cid, "prompt": prompt, "messages": messages, "params": params,
            "endpoint": url, "body_model": body.get("model")}


def _iter_jsonl(path: str) -> Iterator[tuple[int, object, str]]:
    """Yield (line number, parsed object, kind) for each non-blank line."""
    try:
        with open(path, "rb") as probe:
            gz = probe.read(2) == GZIP_MAGIC
        f = gzip.open(path, "rb") if gz else open(path, "rb")
    except OSError as e:
        raise JobFileError(path, f"cannot read file: {e.strerror or e}") from None
    limit, line_limit = max_input_bytes(), max_line_bytes()
    with f:
        lineno = 0
        read = 0
        while True:
            try:
                raw = f.readline(line_limit + 1)
            except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated gzip stream
                raise JobFileError(path, f"cannot read file: {type(e).__name__}: {e}", lineno + 1, unit="line") from None
            if not raw:
                break
            lineno += 1
            read += len(raw)
            if read > limit:
                raise JobFileError(path, f"input is larger than {limit} bytes once decompressed "
                                         "(gzip bomb?); raise PREFIXQ_MAX_INPUT_BYTES to accept it", lineno, unit="line")
            if len(raw) > line_limit:
                raise JobFileError(path, f"line is longer than {line_limit} bytes (PREFIXQ_MAX_LINE_BYTES)", lineno,
                                   unit="line")
            complete = raw.endswith(b"\n")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JobFileError(path, f"invalid UTF-8 at byte {e.start} of the line", lineno, unit="line") from None
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                why = "truncated line (file ends mid-record)" if not complete else f"invalid JSON: {e.msg} at column {e.colno}"
                raise JobFileError(path, why, lineno, unit="line") from None
            yield lineno, obj, "line"


def _iter_parquet(path: str, batch_size: int = 2048) -> Iterator[tuple[int, object, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds
        raise JobFileError(path, f"unreadable Parquet file: {e}") from None
    names = set(pf.schema_arrow.names)
    if "custom_id" not in names:
        raise JobFileError(path, "Parquet schema has no 'custom_id' column", field="custom_id")
    if "prompt" not in names and "messages" not in names:
        raise JobFileError(path, "Parquet schema has neither a 'prompt' nor a 'messages' column", field="prompt")
    cols = [c for c in ("custom_id", "prompt", "messages", *SAMPLING_FIELDS) if c in names]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
            for obj in batch.to_pylist():
                row += 1
                yield row, obj, "row"
    except JobFileError:
        raise
    except Exception as e:  # noqa: BLE001
        raise JobFileError(path, f"unreadable Parquet data: {e}", row + 1) from None


def iter_rows(path: str, fmt: str | None = None, kind: str | None = None) -> Iterator[dict]:
    """Stream normalized rows: dicts with index (0-based), custom_id, prompt|messages,
    params (type-checked, values unchecked) and endpoint (OpenAI input only).
    Raises JobFileError on the first file-level problem. Does not check duplicates."""
    fmt = fmt or detect_format(path)
    if not os.path.exists(path):
        raise JobFileError(path, "file not found")
    source = _iter_parquet(path) if fmt == "parquet" else _iter_jsonl(path)
    index = 0
    for num, obj, unit in source:
        def err(field, msg, _num=num, _unit=unit):
            raise JobFileError(path, msg, _num, field, unit=_unit)
        if kind is None:
            kind = "openai" if fmt == "jsonl" and isinstance(obj, dict) and ("body" in obj or "url" in obj) else "native"
        row = normalize_openai(obj, err) if kind == "openai" else normalize_native(obj, err)
        row["index"] = index
        row["line"] = num
        index += 1
        yield row


def validate_file(path: str) -> dict:
    """Stream the whole file once; return {format, kind, rows, endpoints}. Raises JobFileError."""
    fmt = detect_format(path)
    if not os.path.exists(path):
        raise JobFileError(path, "file not found")
    if not os.access(path, os.R_OK) or os.path.isdir(path):
        raise JobFileError(path, "cannot read file")
    seen: set[bytes] = set()
    n = 0
    kind = None
    endpoints: set[str] = set()
    for row in iter_rows(path, fmt):
        if kind is None:
            kind = "openai" if row["endpoint"] else "native"
        d = hashlib.blake2b(row["custom_id"].encode("utf-8", "surrogatepass"), digest_size=8).digest()
        if d in seen:
            unit = "row" if fmt == "parquet" else "line"
            raise JobFileError(path, f"duplicate custom_id {row['custom_id']!r}", row["line"], "custom_id", unit=unit)
        seen.add(d)
        if row["endpoint"]:
            endpoints.add(row["endpoint"])
        n += 1
    if n == 0:
        raise JobFileError(path, "file is empty (no rows)")
    return {"format": fmt, "kind": kind, "rows": n, "endpoints": sorted(endpoints)}
