"""Stores: local directory and S3 on a real moto server (write-once, traversal guards, plain-boto3 reads)."""
import boto3
import pytest

from storage import AlreadyExists, LocalStore, NotFound, S3Store, open_store, validate_key


@pytest.mark.parametrize("key", ["../x", "a/../../b", "/etc/passwd", "a//b", "a/./b", "a\\b", "", "a/b\x00", "a/ b"])
def test_bad_keys_refused(key):
    with pytest.raises(ValueError):
        validate_key(key)


def _exercise(store):
    store.put_bytes("jobs/j1/a.txt", b"hello")
    assert store.get_bytes("jobs/j1/a.txt") == b"hello"
    assert store.exists("jobs/j1/a.txt") and not store.exists("jobs/j1/zz")
    store.put_bytes("jobs/j1/a.txt", b"overwrite")
    assert store.get_bytes("jobs/j1/a.txt") == b"overwrite"
    store.put_bytes("jobs/j1/sub/b.txt", b"b")
    assert store.list("jobs/j1") == ["jobs/j1/a.txt", "jobs/j1/sub/b.txt"]
    assert store.list("jobs/none") == []
    store.put_bytes("jobs/j1/final", b"first", if_none_match=True)
    with pytest.raises(AlreadyExists):
        store.put_bytes("jobs/j1/final", b"second", if_none_match=True)
    assert store.get_bytes("jobs/j1/final") == b"first"
    with pytest.raises(NotFound):
        store.get_bytes("jobs/j1/missing")
    for bad in ("../escape", "jobs/../../escape", "/abs"):
        with pytest.raises(ValueError):
            store.put_bytes(bad, b"x")
    store.delete("jobs/j1/sub/b.txt")
    assert store.list("jobs/j1") == ["jobs/j1/a.txt", "jobs/j1/final"]


def test_local_store(tmp_path):
    root = tmp_path / "root"
    store = open_store(f"file://{root}")
    assert isinstance(store, LocalStore)
    _exercise(store)
    assert not (tmp_path / "escape").exists()
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 3_000_000)
    store.put_file("jobs/j2/input.jsonl", str(src))
    store.get_file("jobs/j2/input.jsonl", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_local_store_symlink_escape(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    store = LocalStore(root)
    with pytest.raises(ValueError):
        store.put_bytes("link/x", b"no")
    assert not (tmp_path / "outside" / "x").exists()


def test_s3_store_on_moto(s3_server, s3_bucket, tmp_path):
    store = open_store(f"s3://{s3_bucket}/pfx")
    assert isinstance(store, S3Store) and store.endpoint_url == s3_server
    cfg = store.client.meta.config
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.response_checksum_validation == "when_required"
    assert cfg.retries["mode"] == "standard"
    _exercise(store)
    # a plain S3 client sees the objects under the prefix
    plain = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    assert plain.get_object(Bucket=s3_bucket, Key="pfx/jobs/j1/final")["Body"].read() == b"first"
    src = tmp_path / "f.bin"
    src.write_bytes(b"y" * 100_000)
    store.put_file("jobs/j3/input.parquet", str(src))
    store.get_file("jobs/j3/input.parquet", str(tmp_path / "g.bin"))
    assert (tmp_path / "g.bin").read_bytes() == src.read_bytes()
    assert store.uri("jobs/j3/input.parquet") == f"s3://{s3_bucket}/pfx/jobs/j3/input.parquet"


def test_s3_store_without_prefix(s3_bucket):
    store = open_store(f"s3://{s3_bucket}")
    store.put_bytes("a/b", b"1", if_none_match=True)
    with pytest.raises(AlreadyExists):
        store.put_bytes("a/b", b"2", if_none_match=True)
    assert store.list("a") == ["a/b"]


def test_bad_store_url():
    with pytest.raises(ValueError):
        open_store("ftp://x/y")
    with pytest.raises(ValueError):
        open_store("s3:///nobucket")
