"""Job inputs given as store URLs (`s3://bucket/key`, `file:///dir/key`), with glob patterns.

`submit` validates a local file while streaming it, so a store object is first copied into a
temporary directory under its own name (the job keeps that name as `source_name`).
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

from jobs import state
from storage import open_store
from storage.base import Store

STORE_SCHEMES = ("s3", "file")
_GLOB = set("*?[")


def is_store_url(text: str) -> bool:
    return urlparse(text).scheme in STORE_SCHEMES


@dataclass(frozen=True)
class StoreObject:
    store: Store
    key: str

    @property
    def url(self) -> str:
        return self.store.url.rstrip("/") + "/" + self.key


def _split(url: str) -> tuple[str, str]:
    """('s3://bucket', 'a/b/c.jsonl') for 's3://bucket/a/b/c.jsonl'."""
    u = urlparse(url)
    if u.scheme == "s3":
        if not u.netloc:
            raise ValueError(f"store URL {url!r} has no bucket")
        return f"s3://{u.netloc}", u.path.lstrip("/")
    if u.scheme == "file":
        path = (u.netloc + u.path) if u.netloc else u.path
        # the store root is the longest leading directory without a glob character
        parts = path.split("/")
        root = []
        for p in parts[:-1]:
            if _GLOB & set(p):
                break
            root.append(p)
        return "file://" + ("/".join(root) or "/"), "/".join(parts[len(root):])
    raise ValueError(f"not a store URL: {url!r} (use s3://bucket/key or file:///path)")


def expand(url: str) -> list[StoreObject]:
    """The objects a URL names: one key, or every key matching a glob (sorted). Raises
    FileNotFoundError when nothing matches."""
    base, key = _split(url)
    store = open_store(base)
    if not _GLOB & set(key):
        if not store.exists(key):
            raise FileNotFoundError(f"{url}: no such object")
        return [StoreObject(store, key)]
    # list under the fixed part of the pattern, then match the rest
    fixed = []
    for p in key.split("/"):
        if _GLOB & set(p):
            break
        fixed.append(p)
    listing = store.list("/".join(fixed)) if fixed else _list_all(store)
    found = [StoreObject(store, k) for k in listing if fnmatch.fnmatchcase(k, key)]
    if not found:
        raise FileNotFoundError(f"{url}: no object matches")
    return found


def _list_all(store: Store) -> list[str]:
    # Store.list needs a folder; a pattern starting with a glob lists the top-level folders' contents
    from storage.base import LocalStore
    if isinstance(store, LocalStore):
        return [k for top in sorted(os.listdir(store.root)) for k in
                ([top] if (store.root / top).is_file() else store.list(top))]
    raise ValueError("a glob on S3 needs a fixed leading folder, e.g. s3://bucket/evals/*.jsonl")


@contextmanager
def fetched(obj: StoreObject) -> Iterator[str]:
    """A local copy of the object, removed afterwards."""
    d = tempfile.mkdtemp(prefix="prefixq-input-")
    try:
        path = os.path.join(d, os.path.basename(obj.key))
        obj.store.get_file(obj.key, path)
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


def split_rows_key(job_id: str) -> str:
    """Per-job override of the worker's --split-rows, written before the job is enqueued."""
    return state.job_key(job_id) + ":split_rows"


def submit_file(client, path: str, *, split_rows: int | None = None, job_id: str | None = None, **options) -> str:
    """Client.submit, plus the job's split threshold when one is given."""
    if split_rows is None:
        return client.submit(path, job_id=job_id, **options)
    if split_rows < 0:
        raise ValueError("--split-rows must be >= 0 (0: never split)")
    job_id = state.validate_job_id(job_id) if job_id else state.new_job_id()
    client.r.set(split_rows_key(job_id), split_rows, ex=30 * 86400)
    try:
        return client.submit(path, job_id=job_id, **options)
    except BaseException:
        client.r.delete(split_rows_key(job_id))
        raise


def submit_url(client, url: str, *, split_rows: int | None = None, **options) -> list[str]:
    """Submit every object the URL names as its own job; return the job ids in key order."""
    ids = []
    for obj in expand(url):
        with fetched(obj) as path:
            ids.append(submit_file(client, path, split_rows=split_rows, **options))
    return ids
