"""Worker on a tiny random model: row-level errors, resume from committed shards, cancel,
surviving a bad job under a real rq SimpleWorker, and a Prometheus scrape."""
import json
import urllib.request

import pyarrow.parquet as pq
import pytest
import redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from engine.hf_backend import HFEngine
from jobs import state
from jobs.client import Client
from storage import open_store
from worker import results as res
from worker import runner
from worker.metrics import Metrics



def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    return HFEngine(tiny_model, device="cpu", max_num_seqs=8)


@pytest.fixture
def ctx(tiny_engine, redis_url):
    c = runner.WorkerContext(engine=tiny_engine, engine_kind="hf", model="tiny", redis=state.connect(redis_url),
                             metrics=Metrics(), window=4, max_inflight=4, shard_rows=3, shard_seconds=60,
                             heartbeat_seconds=0.2)
    runner.set_context(c)
    yield c
    runner.set_context(None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows_for(n):
    return [{"custom_id": f"r{i}", "prompt": f"Row number {i} says", "max_tokens": 3, "temperature": 0}
            for i in range(n)]


def read_results(store, rec):
    data = store.get_bytes(rec["results_key"])
    import io
    return pq.read_table(io.BytesIO(data)).to_pylist()


def test_row_level_errors_fail_only_their_row(ctx, redis_url, tmp_path):
    rows = rows_for(5)
    rows[1] = {"custom_id": "too-long", "prompt": "word " * 400}  # tiny model context is 128
    rows[3] = {"custom_id": "bad-temp", "prompt": "hi", "temperature": -2.0}
    rows.append({"custom_id": "bad-top-p", "messages": [{"role": "user", "content": "hi"}], "top_p": 0.0})
    rows.append({"custom_id": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                 "stop": ["zzz"], "temperature": 0.7, "seed": 3})
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    job = c.submit(write_jsonl(tmp_path / "j.jsonl", rows), max_tokens=4)
    out = runner.run_job(job)
    assert out["status"] == "succeeded"
    rec = c.status(job)
    assert rec["status"] == "succeeded" and rec["done"] == 4 and rec["failed"] == 3 and rec["attempts"] == 1
    got = read_results(c.store, rec)
    assert [r["custom_id"] for r in got] == [r["custom_id"] for r in rows]  # input order
    by = {r["custom_id"]: r for r in got}
    assert by["too-long"]["finish_reason"] == "error" and "context" in by["too-long"]["error"]
    assert by["bad-temp"]["finish_reason"] == "error" and "temperature" in by["bad-temp"]["error"]
    assert by["bad-top-p"]["finish_reason"] == "error" and "top_p" in by["bad-top-p"]["error"]
    for cid in ("r0", "r2", "r4", "chat"):
        assert by[cid]["finish_reason"] in ("stop", "length") and by[cid]["error"] is None
        assert by[cid]["prompt_tokens"] > 0 and 1 <= by[cid]["completion_tokens"] <= 4
    assert by["chat"]["completion_tokens"] <= 2
    man = json.loads(c.store.get_bytes(rec["manifest_key"]))
    assert man["counts"] == {"total": 7, "succeeded": 4, "failed": 3}
    assert man["settings"]["max_tokens"] == 4 and "prefix_cache_hit_rate" in man and "engine_stats" in man
    # shards were committed every 3 rows, deterministic keys
    keys = c.store.list(f"jobs/{job}/commits")
    assert keys[0].endswith("000000.json") and len(keys) >= 2


def test_resume_skips_committed_rows(ctx, redis_url, tmp_path):
    rows = rows_for(6)
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    job = c.submit(write_jsonl(tmp_path / "j.jsonl", rows), output_format="jsonl")
    # an earlier attempt committed rows 0-2
    w = res.ShardWriter(c.store, f"jobs/{job}", "jsonl", 0, 1, "old-worker")
    for i in range(3):
        w.add({"row": i, "custom_id": f"r{i}", "text": f"OLD{i}", "finish_reason": "stop", "prompt_tokens": 1,
               "completion_tokens": 1, "error": None, "latency_ms": 1.0})
    w.flush()
    before = ctx.engine.stats()["requests"]
    runner.run_job(job)
    assert ctx.engine.stats()["requests"] - before == 3  # only the 3 uncommitted rows ran
    rec = c.status(job)
    lines = [json.loads(x) for x in c.store.get_bytes(rec["results_key"]).decode().splitlines()]
    assert [x["custom_id"] for x in lines] == [f"r{i}" for i in range(6)]
    assert [x["text"] for x in lines[:3]] == ["OLD0", "OLD1", "OLD2"]
    assert "row" not in lines[0]
    # running the job again changes nothing (write-once results)
    state.set_status(c.r, job, "queued")
    runner.run_job(job)
    assert [json.loads(x) for x in c.store.get_bytes(rec["results_key"]).decode().splitlines()] == lines


def test_cancel(ctx, redis_url, tmp_path):
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    job = c.submit(write_jsonl(tmp_path / "j.jsonl", rows_for(3)))
    assert c.cancel(job)
    assert runner.run_job(job) == {"status": "cancelled"}
    assert c.status(job)["status"] == "cancelled"
    assert not c.cancel(job)
    # a running job notices the flag
    job2 = c.submit(write_jsonl(tmp_path / "k.jsonl", rows_for(40)))
    state.update(c.r, job2, cancel_requested=1)
    ctx.progress_seconds = 0.0
    try:
        assert runner.JobRunner(ctx, job2).run() == {"status": "cancelled"}
    finally:
        ctx.progress_seconds = 1.0
    assert c.status(job2)["status"] == "cancelled"


def test_worker_survives_bad_job(ctx, redis_url, tmp_path):
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    bad = c.submit(write_jsonl(tmp_path / "bad.jsonl", rows_for(2)))
    c.store.delete(f"jobs/{bad}/input.jsonl")  # the job's input vanished: the job must fail, not the worker
    good = c.submit(write_jsonl(tmp_path / "good.jsonl", rows_for(2)))
    conn = redis.Redis.from_url(redis_url)
    q = Queue(state.DEFAULT_QUEUE, connection=conn, serializer=JSONSerializer)
    w = SimpleWorker([q], connection=conn, serializer=JSONSerializer)
    ctx.rq_worker = w
    w.work(burst=True)
    b, g = c.status(bad), c.status(good)
    assert b["status"] == "failed" and "NotFound" in b["error"] and b["attempt_reasons"]
    assert g["status"] == "succeeded" and g["done"] == 2
    assert not g["heartbeat_alive"]


def test_pickle_payload_refused(ctx, redis_url, tmp_path):
    """Only JSON crosses Redis: a job whose payload is a pickle cannot be deserialized by the worker."""
    import pickle
    conn = redis.Redis.from_url(redis_url)
    q = Queue(state.DEFAULT_QUEUE, connection=conn, serializer=JSONSerializer)
    job = q.enqueue("worker.runner.run_job", "jplanted-0001", job_id="jplanted-0001")
    conn.hset(f"rq:job:{job.id}", "data", pickle.dumps(("os.system", None, ("echo pwned",), {})))
    w = SimpleWorker([q], connection=conn, serializer=JSONSerializer)
    w.work(burst=True)
    assert conn.exists(f"rq:job:{job.id}") == 0 or job.get_status(refresh=True) != "finished"


def test_metrics_scrape(redis_url):
    r = state.connect(redis_url)
    state.create(r, "jmetrics-1", {"total": 3})
    m = Metrics(redis_conn=r)
    port = free_port()
    m.serve(port, addr="127.0.0.1")
    m.model_load_seconds.set(1.5)
    m.observe_engine({"spec_proposed": 40, "spec_accepted": 30, "spec_verifications": 12, "cascade_steps": 7,
                      "burst_steps": 5},
                     {"spec_accepted": 6, "spec_verifications": 4})
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "prefixq_spec_mean_accepted_length 3.0" in body  # (30 - 6) / (12 - 4): this job's share
    assert "prefixq_cascade_decode_steps 7.0" in body
    assert "prefixq_burst_decode_steps 5.0" in body
    for name in ("prefixq_queue_depth 1.0", 'prefixq_jobs{state="queued"} 1.0', "prefixq_rows_completed_total",
                 "prefixq_rows_failed_total", "prefixq_prompt_tokens_total", "prefixq_cached_prompt_tokens_total",
                 "prefixq_output_tokens_total", "prefixq_ttft_seconds_bucket",
                 "prefixq_time_per_output_token_seconds_bucket", "prefixq_row_latency_seconds_bucket",
                 "prefixq_kv_cache_usage_ratio", "prefixq_prefix_cache_hit_rate", "prefixq_spec_acceptance_rate",
                 "prefixq_model_load_seconds 1.5", "prefixq_gpu_memory_bytes"):
        assert name in body, name
