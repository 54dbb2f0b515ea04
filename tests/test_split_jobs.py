"""One job over many workers: a job above --split-rows is split into shard jobs that 3 real
`prefixq worker` processes run in parallel; the last shard merges the results in input order."""
import json
import os
import subprocess
import sys
import time

from jobs import state
from jobs.client import Client
from storage import open_store
from worker import split_jobs

BIN = os.path.dirname(sys.executable)


def _worker(env, tiny_model):
    return subprocess.Popen([os.path.join(BIN, "prefixq"), "worker", "--model", tiny_model, "--engine", "hf",
                             "--device", "cpu", "--metrics-port", "0", "--max-num-seqs", "4", "--no-bridge"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_aggregate_sums_shard_progress(redis_url):
    r = state.connect(redis_url)
    state.create(r, "jparent-1", {"total": 10, "split_shards": 2})
    state.create(r, split_jobs.shard_id("jparent-1", 0), {"total": 5, "parent": "jparent-1"})
    state.create(r, split_jobs.shard_id("jparent-1", 1), {"total": 5, "parent": "jparent-1"})
    state.set_status(r, "jparent-1-s0000", "succeeded", done=4, failed=1, rows_per_s=9.0)
    state.set_status(r, "jparent-1-s0001", "running", done=2, failed=0, rows_per_s=3.5)
    assert split_jobs.aggregate(r, "jparent-1") == {"done": 6, "failed": 1, "rows_per_s": 3.5}


def test_three_workers_share_one_job(redis_url, tmp_path, tiny_model):
    store_url = f"file://{tmp_path}/store"
    env = dict(os.environ, PREFIXQ_REDIS_URL=redis_url, PREFIXQ_STORE=store_url)
    # 6 prefix groups of 5 rows, interleaved so input order differs from prefix order
    groups = [f"System: you answer questions about topic number {g} with care and precision. " * 2
              for g in range(6)]
    rows = [{"custom_id": f"row-{i:02d}", "prompt": groups[i % 6] + f"Question {i}:", "max_tokens": 4,
             "temperature": 0} for i in range(30)]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = state.connect(redis_url)
    workers = [_worker(env, tiny_model) for _ in range(3)]
    try:
        deadline = time.monotonic() + 180
        while r.scard("rq:workers") < 3:  # all three listening before the job exists
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
            time.sleep(0.5)
        p = subprocess.run([os.path.join(BIN, "prefixq"), "submit", str(path), "--split-rows", "10",
                            "--output-format", "jsonl"], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        job = p.stdout.strip()
        rec = Client(redis_url=redis_url, store_url=store_url).wait(job, progress=False, timeout=240)
    finally:
        for w in workers:
            w.terminate()
        logs = [w.communicate(timeout=60)[0] for w in workers]
    assert rec["status"] == "succeeded", (rec, [x[-2000:] for x in logs])
    assert rec["done"] == 30 and rec["failed"] == 0 and int(rec["split_shards"]) >= 3
    store = open_store(store_url)
    got = [json.loads(x) for x in store.get_bytes(rec["results_key"]).decode().splitlines()]
    assert [x["custom_id"] for x in got] == [x["custom_id"] for x in rows]  # every row once, in order
    assert all(x["finish_reason"] in ("stop", "length") and x["text"] is not None for x in got)
    shards = [state.get(r, split_jobs.shard_id(job, k)) for k in range(int(rec["split_shards"]))]
    assert all(s["status"] == "succeeded" and s["parent"] == job for s in shards)
    assert sum(s["total"] for s in shards) == 30
    assert len({s["worker"] for s in shards}) >= 2, [s["worker"] for s in shards]  # work was spread
    # shared prefixes stayed together: each prefix group is in exactly one shard
    plan = split_jobs.Plan.from_json(store.get_bytes(split_jobs.plan_key(job)))
    shard_of = {i: k for k, (_, idx) in enumerate(plan.shards) for i in idx}
    for g in range(6):
        assert len({shard_of[i] for i in range(g, 30, 6)}) == 1
    manifest = json.loads(store.get_bytes(rec["manifest_key"]))
    assert manifest["counts"] == {"total": 30, "succeeded": 30, "failed": 0}
    assert len(manifest["split"]["workers"]) >= 2


def test_split_in_process_rerun_and_cancel(redis_url, tmp_path, tiny_model):
    """The split is idempotent (a rerun of the parent reuses the plan and shards), shards of a
    cancelled parent do not run, and the last shard merges in input order."""
    from engine.hf_backend import HFEngine
    from worker import runner
    ctx = runner.WorkerContext(engine=HFEngine(tiny_model, device="cpu", max_num_seqs=4), engine_kind="hf",
                               model="tiny", redis=state.connect(redis_url), window=4, max_inflight=4,
                               shard_rows=3, shard_seconds=60, heartbeat_seconds=0.2)
    ctx.split_rows = 4
    runner.set_context(ctx)
    try:
        c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
        path = tmp_path / "j.jsonl"
        path.write_text("".join(json.dumps({"custom_id": f"c{i}", "prompt": f"p {i % 3} q {i}", "max_tokens": 2})
                                + "\n" for i in range(10)))
        job = c.submit(str(path), output_format="jsonl")
        first = runner.run_job(job)
        assert first["status"] == "split" and first["shards"] >= 3
        queued = c.r.llen("rq:queue:prefixq")
        assert split_jobs.split(ctx, state.get(c.r, job)) == first  # rerun: same plan, nothing new enqueued
        assert c.r.llen("rq:queue:prefixq") == queued
        shards = [split_jobs.shard_id(job, k) for k in range(first["shards"])]
        for sid in shards[:-1]:
            assert runner.run_job(sid)["status"] == "succeeded"
            assert c.status(job)["status"] == "running"
        assert c.status(job)["done"] == sum(state.get(c.r, s)["total"] for s in shards[:-1])  # aggregated
        runner.run_job(shards[-1])
        rec = c.status(job)
        assert rec["status"] == "succeeded" and rec["done"] == 10 and not rec["heartbeat_alive"]
        got = [json.loads(x)["custom_id"] for x in c.store.get_bytes(rec["results_key"]).decode().splitlines()]
        assert got == [f"c{i}" for i in range(10)]
        # a cancelled parent: its shards end cancelled without running
        job2 = c.submit(str(path), output_format="jsonl")
        n = runner.run_job(job2)["shards"]
        assert c.cancel(job2)
        before = ctx.engine.stats()["requests"]
        assert runner.run_job(split_jobs.shard_id(job2, 0)) == {"status": "cancelled"}
        assert ctx.engine.stats()["requests"] == before and n >= 3
    finally:
        runner.set_context(None)
