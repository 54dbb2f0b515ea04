"""Keep credentials out of logs and error messages.

prefixq never logs URLs with credentials on purpose; this is the second line of defence against
a library that does (an exception message quoting a connection URL, say). Secrets are collected
from the environment (AWS keys, passwords in PREFIXQ_REDIS_URL / PREFIXQ_STORE_URL) and from URLs
the process was given, and replaced by `***` in every log record and in error messages written
to Redis.
"""
from __future__ import annotations

import logging
import os
from urllib.parse import unquote, urlsplit

MASK = "***"
_ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "PREFIXQ_REDIS_PASSWORD")
_ENV_URLS = ("PREFIXQ_REDIS_URL", "PREFIXQ_STORE_URL", "PREFIXQ_STORE")
_extra: set[str] = set()


def url_secrets(url: str | None) -> list[str]:
    if not url:
        return []
    try:
        u = urlsplit(url)
    except ValueError:
        return []
    out = [u.password, unquote(u.password) if u.password else None]
    if u.username and u.password is None and u.scheme.startswith("redis"):
        out.append(u.username)  # redis://:pw@ parses pw as the password; redis://pw@ as a username
    return [x for x in out if x]


def add_secret_urls(*urls: str | None) -> None:
    for u in urls:
        _extra.update(url_secrets(u))


def secrets() -> list[str]:
    found = set(_extra)
    for name in _ENV_SECRETS:
        v = os.environ.get(name)
        if v:
            found.add(v)
    for name in _ENV_URLS:
        found.update(url_secrets(os.environ.get(name)))
    return sorted((s for s in found if len(s) >= 4), key=len, reverse=True)  # longest first


def redact(text: str) -> str:
    for s in secrets():
        if s in text:
            text = text.replace(s, MASK)
    return text


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install() -> None:
    """Add the filter to every root handler (call after logging is configured)."""
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, RedactFilter) for f in h.filters):
            h.addFilter(RedactFilter())
