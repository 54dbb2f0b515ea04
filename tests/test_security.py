"""Security: only JSON crosses Redis, user-derived keys cannot escape the job, credentials never
show up in logs/manifest/results/status/metrics, S3 SSE and presigned URLs, Redis AUTH."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import boto3
import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from jobs import state
from jobs.client import Client
from storage import open_store
from storage.base import StoreError, validate_key

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_planted_pickle_is_never_executed(redis_url, tmp_path):
    """A pickled payload planted in the queue is refused by the JSON-only worker; a good job after
    it still runs, and the pickle's command never ran."""
    import pickle
    from worker.lifecycle import PrefixqWorker
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    conn = redis.Redis.from_url(redis_url)
    q = Queue(state.DEFAULT_QUEUE, connection=conn, serializer=JSONSerializer)
    job = q.enqueue("worker.runner.run_job", "jplanted-0001", job_id="jplanted-0001")
    conn.hset(f"rq:job:{job.id}", "data", pickle.dumps(Evil()))
    w = PrefixqWorker([q], connection=conn, serializer=JSONSerializer)
    w.work(burst=True)
    assert not marker.exists()
    assert job.get_status(refresh=False) != "finished"
    assert conn.llen(f"rq:queue:{state.DEFAULT_QUEUE}") == 0


@pytest.mark.parametrize("job_id", ["../etc", "a/../../b", "j..", "x", "a" * 80, "j 1", "j\n1", "/abs", "j%2e%2e"])
def test_bad_job_ids_refused(job_id):
    with pytest.raises(ValueError):
        state.validate_job_id(job_id)


@pytest.mark.parametrize("key", ["../x", "jobs/../../x", "/etc/passwd", "a//b", "a/./b", "a\\b", "a/b\x00", ""])
def test_bad_keys_refused(key, tmp_path):
    with pytest.raises(ValueError):
        validate_key(key)
    with pytest.raises(ValueError):
        open_store(f"file://{tmp_path}").put_bytes(key, b"x")


def test_symlink_cannot_escape_local_store(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = open_store(f"file://{tmp_path}/store")
    os.symlink(outside, tmp_path / "store" / "link")
    with pytest.raises(ValueError, match="escapes"):
        store.put_bytes("link/evil", b"x")
    assert list(outside.iterdir()) == []


def test_planted_record_cannot_point_outside_the_job(redis_url, tmp_path):
    """A job record edited in Redis to read or write another job's keys fails that job only."""
    from worker import runner
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    (tmp_path / "j.jsonl").write_text('{"custom_id": "a", "prompt": "x"}\n')
    job = c.submit(str(tmp_path / "j.jsonl"))
    state.update(c.r, job, results_key="jobs/jother-0001/results.parquet")
    ctx = runner.WorkerContext(engine=None, engine_kind="none", model="none", redis=c.r)
    with pytest.raises(ValueError, match="outside the job's prefix"):
        runner.JobRunner(ctx, job).run()
    assert c.status(job)["status"] == "failed"
    assert not c.store.exists("jobs/jother-0001/results.parquet")


def test_store_url_with_credentials_refused_without_echo():
    with pytest.raises(ValueError) as e:
        open_store("s3://AKIAFAKE:SuperSecret123@bucket/prefix")
    assert "SuperSecret123" not in str(e.value) and "AKIAFAKE" not in str(e.value)


def test_sse_on_puts_and_multipart(s3_server, s3_bucket, monkeypatch, tmp_path):
    monkeypatch.setenv("PREFIXQ_S3_SSE", "AES256")
    monkeypatch.setenv("PREFIXQ_S3_MULTIPART_BYTES", str(6 << 20))
    import storage.base as sb
    try:
        store = sb.open_store(f"s3://{s3_bucket}/p")
        s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
        store.put_bytes("small", b"x")
        big = tmp_path / "big"
        big.write_bytes(os.urandom(7 << 20))
        store.put_file("big", str(big), if_none_match=True)
        for k in ("small", "big"):
            assert s3.head_object(Bucket=s3_bucket, Key=f"p/{k}")["ServerSideEncryption"] == "AES256"
        with pytest.raises(sb.AlreadyExists):
            store.put_file("big", str(big), if_none_match=True)  # write-once holds for multipart too
        monkeypatch.setenv("PREFIXQ_S3_SSE", "aws:kms")
        monkeypatch.setenv("PREFIXQ_S3_SSE_KMS_KEY_ID", "alias/prefixq")
        assert sb.sse_args() == {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/prefixq"}
        monkeypatch.setenv("PREFIXQ_S3_SSE", "rot13")
        with pytest.raises(ValueError, match="PREFIXQ_S3_SSE"):
            sb.sse_args()
    finally:
        monkeypatch.delenv("PREFIXQ_S3_SSE")


def test_presign_s3_and_clear_error_for_file(redis_url, s3_server, s3_bucket, tmp_path):
    c = Client(redis_url=redis_url, store_url=f"s3://{s3_bucket}/batch")
    (tmp_path / "j.jsonl").write_text('{"custom_id": "a", "prompt": "x"}\n')
    job = c.submit(str(tmp_path / "j.jsonl"), output_format="jsonl")
    c.store.put_bytes(f"jobs/{job}/results.jsonl", b'{"custom_id": "a"}\n')
    state.set_status(c.r, job, "succeeded")
    urls = c.presign(job, expires=60)
    assert urls and ("Expires=" in urls[0] or "X-Amz-Expires=60" in urls[0])
    assert urllib.request.urlopen(urls[0], timeout=10).read() == b'{"custom_id": "a"}\n'
    lc = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    job2 = lc.submit(str(tmp_path / "j.jsonl"))
    state.set_status(lc.r, job2, "succeeded")
    lc.store.put_bytes(f"jobs/{job2}/results.parquet", b"x")
    with pytest.raises(StoreError, match="presigned URLs need an S3 store"):
        lc.presign(job2)


def test_credentials_never_leak(tmp_path, s3_server, s3_bucket, tiny_model):
    """A whole job with recognizable fake credentials (Redis password in the URL, AWS keys):
    none of them appears in logs, Redis, the store's objects, status output or /metrics."""
    secret_pw, key_id, secret_key = "SECRETPASS9f3", "AKIAFAKEKEY7Q2X", "FAKESECRETr9vX2kLm"
    port = free_port()
    rdir = tmp_path / "redis"
    rdir.mkdir()
    rs = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                           "--requirepass", secret_pw, "--save", "", "--appendonly", "no", "--dir", str(rdir)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        url = f"redis://:{secret_pw}@127.0.0.1:{port}/0"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, password="wrong").ping()  # AUTH is enforced
        mport = free_port()
        env = dict(os.environ, PREFIXQ_REDIS_URL=url, PREFIXQ_STORE_URL=f"s3://{s3_bucket}/sec",
                   PREFIXQ_S3_ENDPOINT=s3_server, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret_key,
                   AWS_DEFAULT_REGION="us-east-1", PREFIXQ_LOG_LEVEL="DEBUG", OMP_NUM_THREADS="1")
        rows = [{"custom_id": "a", "prompt": "hello", "max_tokens": 3},
                {"custom_id": "b", "prompt": "x", "temperature": -1}]
        (tmp_path / "j.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        sub = subprocess.run([os.path.join(BIN, "prefixq"), "submit", str(tmp_path / "j.jsonl")], env=env,
                             capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0, sub.stderr
        job = sub.stdout.strip()
        log_path = tmp_path / "worker.log"
        with open(log_path, "w") as out:
            worker = subprocess.Popen([os.path.join(BIN, "prefixq"), "worker", "--engine", "paged", "--device", "cpu",
                                       "--model", tiny_model, "--metrics-port", str(mport)], env=env,
                                      stdout=out, stderr=subprocess.STDOUT)
        r = redis.Redis.from_url(url, decode_responses=True)
        deadline = time.monotonic() + 120
        while r.hget(f"prefixq:job:{job}", "status") != "succeeded" and time.monotonic() < deadline:
            time.sleep(0.3)
        assert r.hget(f"prefixq:job:{job}", "status") == "succeeded", log_path.read_text()[-3000:]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        status = subprocess.run([os.path.join(BIN, "prefixq"), "status", job, "--json"], env=env,
                                capture_output=True, text=True, timeout=60)
        worker.terminate()
        worker.wait(60)
        haystack = [sub.stdout + sub.stderr, log_path.read_text(), metrics, status.stdout + status.stderr]
        for k in r.scan_iter("*"):  # everything in Redis, rq's keys included
            t = r.type(k)
            if t == "hash":
                haystack.append(repr(redis.Redis.from_url(url).hgetall(k)))
            elif t == "string":
                haystack.append(repr(redis.Redis.from_url(url).get(k)))
            elif t == "list":
                haystack.append(repr(r.lrange(k, 0, -1)))
        s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
        for obj in s3.list_objects_v2(Bucket=s3_bucket, Prefix="sec/")["Contents"]:
            haystack.append(s3.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read().decode("latin-1"))
        assert any("manifest" in h or "results" in h for h in haystack)
        for secret in (secret_pw, key_id, secret_key):
            assert not [h[:200] for h in haystack if secret in h], secret
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        rs.terminate()
        rs.wait(10)
