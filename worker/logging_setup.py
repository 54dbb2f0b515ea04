"""Structured logs that carry job ids: `--log-format json|text` (env PREFIXQ_LOG_FORMAT).

The job id comes from a context variable set around each job (`job_context`), or from
`extra={"job_id": ...}` on a single call, so every line logged while a job runs is tagged
with it, including rq's own lines.
"""
from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

FORMATS = ("text", "json")
_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("prefixq_job_id", default=None)
# logging.LogRecord attributes, so `extra` fields can be told apart from them
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "job_id"}


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


def current_job_id() -> str | None:
    return _job_id.get()


class JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "job_id", None):
            record.job_id = _job_id.get() or ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if getattr(record, "job_id", ""):
            out["job_id"] = record.job_id
        for k, v in vars(record).items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(job)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.job = f" [job={record.job_id}]" if getattr(record, "job_id", "") else ""
        return super().format(record)


def setup(fmt: str | None = None, level: str | None = None) -> None:
    """Configure the root logger once per process (replaces handlers set before)."""
    fmt = (fmt or os.environ.get("PREFIXQ_LOG_FORMAT") or "text").lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (use text or json)")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(JobIdFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("PREFIXQ_LOG_LEVEL") or "INFO").upper())
