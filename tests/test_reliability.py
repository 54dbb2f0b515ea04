"""Reliability in one process against a real redis-server and real stores: the reaper and the
dead-letter state, racing runs of one job, graceful drain, store outage pauses, recover, retry."""
import json
import threading
import time

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from jobs import state
from jobs.client import Client
from jobs.recover import recover
from storage import open_store
from storage.retry import OutageRetry, StoreUnavailable
from worker import results as res
from worker import runner
from worker.engine_factory import make_engine
from worker.metrics import Metrics
from worker.reaper import Reaper, ReaperConfig


@pytest.fixture(scope="module")
def paged_engine(tiny_model):
    eng, kind = make_engine("paged", tiny_model, device="cpu", max_num_seqs=8)
    assert kind == "paged"
    return eng


@pytest.fixture
def ctx(paged_engine, redis_url):
    c = runner.WorkerContext(engine=paged_engine, engine_kind="paged", model="tiny", redis=state.connect(redis_url),
                             metrics=Metrics(), window=8, max_inflight=8, shard_rows=4, shard_seconds=60,
                             heartbeat_seconds=0.2, heartbeat_ttl=2.0, progress_seconds=0.0)
    runner.set_context(c)
    yield c
    runner.set_context(None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows_for(n, max_tokens=3):
    return [{"custom_id": f"r{i}", "prompt": f"Row number {i} says", "max_tokens": max_tokens, "temperature": 0}
            for i in range(n)]


def results_jsonl(store, rec):
    return [json.loads(x) for x in store.get_bytes(rec["results_key"]).decode().splitlines()]


def queued_rq_ids(redis_url):
    return [x.decode() for x in redis.Redis.from_url(redis_url).lrange(f"rq:queue:{state.DEFAULT_QUEUE}", 0, -1)]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=60.0):
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def fake_dead_run(r, job_id, silent_s=100.0):
    """A run that claimed the job and then died: its heartbeat key is gone, heartbeat_at is old."""
    got, _ = state.claim(r, job_id, "dead-token", "dead-worker", 30)
    assert got == "ok"
    r.delete(state.heartbeat_key(job_id))
    r.hset(state.job_key(job_id), mapping={"heartbeat_at": time.time() - silent_s, "started_at": time.time() - silent_s})


def test_reaper_requeues_then_dead_letters(redis_url, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXQ_MAX_ATTEMPTS", "3")
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    job = c.submit(write_jsonl(tmp_path / "j.jsonl", rows_for(2)))
    r = c.r
    reaper = Reaper(r, state.bytes_twin(r), "w-reaper", ReaperConfig(interval_s=1, grace_s=5, max_attempts=3))
    # a live job (heartbeat present) and a just-started one are left alone
    state.claim(r, job, "live", "live-worker", 30)
    assert reaper.reap_once() == []
    state.transition(r, job, "queued", token="live")  # back to queued (not a failure)
    r.srem(state.REQUEUE_SET, job)
    for n in (1, 2):
        fake_dead_run(r, job)
        reaped = reaper.reap_once()
        assert [(x.job_id, x.status, x.failures) for x in reaped] == [(job, "queued", n)]
        assert c.status(job)["status"] == "queued"
        assert f"{job}-r{n + 1}" in queued_rq_ids(redis_url)  # back on the rq queue under a fresh rq id
    fake_dead_run(r, job)
    assert [x.status for x in reaper.reap_once()] == ["dead"]
    st = c.status(job)
    assert st["status"] == "dead" and "dead after 3 failed attempts" in st["error"]
    kinds = [x["kind"] for x in st["attempt_reasons"]]
    assert kinds == ["worker_lost"] * 3
    assert all("dead-worker" in x["error"] for x in st["attempt_reasons"] if x["kind"] == "worker_lost")
    assert state.counts_by_state(r)["dead"] == 1
    # the dead state is in the metrics
    import urllib.request
    m, port = Metrics(redis_conn=r), free_port()
    m.serve(port, addr="127.0.0.1")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'prefixq_jobs{state="dead"} 1.0' in body
    # `prefixq retry` requeues by hand and resets the failure count
    c.retry(job)
    st = c.status(job)
    assert st["status"] == "queued" and st["attempt_reasons"][-1]["kind"] == "manual_retry"
    assert state.failures_since_retry(st["attempt_reasons"]) == 0
    with pytest.raises(ValueError):
        c.retry(job)  # queued: nothing to retry


def test_only_one_reaper_at_a_time(redis_url, tmp_path):
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    jobs = [c.submit(write_jsonl(tmp_path / f"j{i}.jsonl", rows_for(1))) for i in range(6)]
    for j in jobs:
        fake_dead_run(c.r, j)
    reapers = [Reaper(state.connect(redis_url), state.connect(redis_url, decode=False), f"w{i}",
                      ReaperConfig(interval_s=1, grace_s=5)) for i in range(4)]
    out: list = []
    threads = [threading.Thread(target=lambda rp=rp: out.extend(rp.reap_once())) for rp in reapers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(x.job_id for x in out) == sorted(jobs)  # each job reaped exactly once
    assert all(len(c.status(j)["attempt_reasons"]) == 1 for j in jobs)


def test_reaper_loses_to_a_finishing_run(redis_url, tmp_path):
    """The owner finishing and the reaper moving the job cannot both win."""
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    job = c.submit(write_jsonl(tmp_path / "j.jsonl", rows_for(1)))
    fake_dead_run(c.r, job)
    assert state.transition(c.r, job, "succeeded", token="dead-token")
    assert not state.transition(c.r, job, "queued", seen_token="dead-token", reason={"kind": "worker_lost"})
    assert c.status(job)["status"] == "succeeded" and c.status(job)["attempt_reasons"] == []


def test_claim_refuses_a_held_job(redis_url, tmp_path):
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    job = c.submit(write_jsonl(tmp_path / "j.jsonl", rows_for(1)))
    assert state.claim(c.r, job, "t1", "w1", 30) == ("ok", 1)
    assert state.claim(c.r, job, "t2", "w2", 30) == ("held", 0)
    c.r.delete(state.heartbeat_key(job))  # its worker died: the job may be claimed again
    assert state.claim(c.r, job, "t3", "w3", 30) == ("ok", 2)


def test_two_runs_racing_give_one_result_per_row(ctx, redis_url, tmp_path):
    """A zombie run (reaped by mistake) keeps committing overlapping rows while the real run works:
    shards and commits never overwrite each other and the final object has each row once."""
    n = 30
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    job = c.submit(write_jsonl(tmp_path / "j.jsonl", rows_for(n)), output_format="jsonl")
    prefix = f"jobs/{job}"
    stop = threading.Event()

    def zombie():
        w = res.ShardWriter(c.store, prefix, "jsonl", 0, 1, "zombie", every_rows=1)
        i = 0
        while not stop.is_set() and i < n:
            w.add({"row": i, "custom_id": f"r{i}", "text": "ZOMBIE", "finish_reason": "stop", "prompt_tokens": 1,
                   "completion_tokens": 1, "error": None, "latency_ms": 1.0})
            w.flush()
            i += 2
    t = threading.Thread(target=zombie)
    t.start()
    out = runner.run_job(job)
    stop.set()
    t.join()
    assert out["status"] == "succeeded"
    rec = c.status(job)
    lines = results_jsonl(c.store, rec)
    assert [x["custom_id"] for x in lines] == [f"r{i}" for i in range(n)]
    assert rec["done"] == n and rec["failed"] == 0
    # every commit points at its own shard, and each shard holds exactly the rows its commit lists
    commits = res.load_commits(c.store, prefix, n).records
    assert len({x["shard"] for x in commits}) == len(commits)
    for x in commits:
        rows = [r["row"] for r in res.decode_rows(c.store.get_bytes(x["shard"]), "jsonl")]
        assert res._ranges(rows) == x["row_ranges"]
    # a second run of the finished job changes nothing
    state.set_status(c.r, job, "queued")
    runner.run_job(job)
    assert results_jsonl(c.store, rec) == lines


def test_graceful_drain_requeues_without_a_failure(ctx, redis_url, tmp_path):
    n = 40
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    job = c.submit(write_jsonl(tmp_path / "j.jsonl", rows_for(n, max_tokens=6)), output_format="jsonl")
    ctx.drain_seconds = 5.0
    committed_before_stop = []

    def stop_when_some_committed():
        while not ctx.stop_event.is_set():
            if c.store.list(f"jobs/{job}/commits"):
                committed_before_stop.append(True)
                ctx.stop_event.set()
            time.sleep(0.01)
    t = threading.Thread(target=stop_when_some_committed, daemon=True)
    t.start()
    try:
        assert runner.run_job(job) == {"status": "requeued"}
    finally:
        ctx.stop_event.set()
        t.join()
        ctx.stop_event.clear()
    st = c.status(job)
    assert st["status"] == "queued" and not st["heartbeat_alive"]
    assert [x["kind"] for x in st["attempt_reasons"]] == ["drained"]
    assert state.failures_since_retry(st["attempt_reasons"]) == 0
    assert f"{job}-r1" in queued_rq_ids(redis_url)
    partial = res.load_commits(c.store, f"jobs/{job}", n)
    assert 0 < partial.count() < n
    before = ctx.engine.stats().get("requests", None)
    assert runner.run_job(job)["status"] == "succeeded"
    lines = results_jsonl(c.store, c.status(job))
    assert [x["custom_id"] for x in lines] == [f"r{i}" for i in range(n)]
    assert c.status(job)["attempts"] == 2
    del before


def test_outage_retry_pauses_and_gives_up(monkeypatch):
    """Against a real moto server frozen with SIGSTOP (it keeps its state): a short outage pauses
    the caller and then succeeds, a longer one than the window raises StoreUnavailable."""
    import signal
    import subprocess
    import sys

    import boto3
    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                 ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PREFIXQ_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("PREFIXQ_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("PREFIXQ_S3_READ_TIMEOUT", "1")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("PREFIXQ_S3_ENDPOINT", endpoint)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="outage")
        store = open_store("s3://outage/p")
        events = []
        retry = OutageRetry(window_s=30, base_s=0.2, cap_s=0.5, on_pause=events.append)
        proc.send_signal(signal.SIGSTOP)
        # longer than botocore's own retries (2 tries x 1 s read timeout), so ours must pause
        timer = threading.Timer(6.0, proc.send_signal, args=(signal.SIGCONT,))
        timer.start()
        t0 = time.monotonic()
        retry("put x", lambda: store.put_bytes("x", b"1"))
        assert time.monotonic() - t0 >= 5.5
        assert events[0].startswith("store unavailable") and events[-1] is None
        assert store.get_bytes("x") == b"1" and retry.paused_total_s >= 3
        proc.send_signal(signal.SIGSTOP)
        with pytest.raises(StoreUnavailable, match="store unavailable"):
            OutageRetry(window_s=4, base_s=0.2, cap_s=0.5)("put y", lambda: store.put_bytes("y", b"1"))
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


def test_recover_rebuilds_lost_state(ctx, redis_url, tmp_path):
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    done_job = c.submit(write_jsonl(tmp_path / "a.jsonl", rows_for(3)))
    runner.run_job(done_job)
    pending = c.submit(write_jsonl(tmp_path / "b.jsonl", rows_for(5)), output_format="jsonl")
    w = res.ShardWriter(c.store, f"jobs/{pending}", "jsonl", 0, 1, "old")
    w.add({"row": 0, "custom_id": "r0", "text": "KEPT", "finish_reason": "stop", "prompt_tokens": 1,
           "completion_tokens": 1, "error": None, "latency_ms": 1.0})
    w.flush()
    c.r.flushall()  # Redis lost everything
    found = {x.job_id: x for x in recover(c.r, state.bytes_twin(c.r), c.store)}
    assert found[done_job].status == "succeeded" and found[done_job].done == 3
    assert found[pending].status == "queued" and found[pending].done == 1
    assert c.status(done_job)["status"] == "succeeded"
    assert c.status(pending)["status"] == "queued" and f"{pending}-recovered" in queued_rq_ids(redis_url)
    assert recover(c.r, state.bytes_twin(c.r), c.store) == []  # idempotent
    # the recovered job runs to completion through a real rq worker, keeping the committed row
    from worker.lifecycle import PrefixqWorker
    conn = redis.Redis.from_url(redis_url)
    wk = PrefixqWorker([Queue(state.DEFAULT_QUEUE, connection=conn, serializer=JSONSerializer)], connection=conn,
                       serializer=JSONSerializer)
    ctx.rq_worker = wk
    wk.work(burst=True)
    lines = results_jsonl(c.store, c.status(pending))
    assert [x["custom_id"] for x in lines] == [f"r{i}" for i in range(5)] and lines[0]["text"] == "KEPT"


def test_gzip_input_runs(ctx, redis_url, tmp_path):
    import gzip
    p = tmp_path / "j.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows_for(5)))
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    job = c.submit(str(p), output_format="jsonl")
    assert c.status(job)["input_key"].endswith("input.jsonl.gz")
    assert runner.run_job(job)["status"] == "succeeded"
    assert [x["custom_id"] for x in results_jsonl(c.store, c.status(job))] == [f"r{i}" for i in range(5)]
