"""Chaos suite: real redis-server (AOF), real moto S3 server, real `prefixq worker` processes on
the tiny model with the paged engine on the CPU. Workers are SIGKILLed at random points and
replaced, SIGTERMed mid-job, Redis is restarted mid-job, S3 is frozen for 10 s mid-commit, many
small jobs arrive from 4 processes at once, and bad input goes through the real path. After each
phase every accepted row must have exactly one result (0 lost, 0 duplicated).

CI runs the short mode (~5 kills, 40 small jobs). PREFIXQ_CHAOS_LONG=1 runs 20 kills and 200
jobs. Figures are printed at the end and, with PREFIXQ_CHAOS_REPORT=path, written as JSON.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time

import boto3
import pytest

from jobs import state
from jobs.client import Client
from tests.chaos.cluster import BIN, Moto, RedisAOF, start_worker

LONG = os.environ.get("PREFIXQ_CHAOS_LONG") == "1"
KILLS = 20 if LONG else 5
SMALL_JOBS = 200 if LONG else 40
SEED = int(os.environ.get("PREFIXQ_CHAOS_SEED", "7"))
FIG: dict = {"jobs_completed": 0, "rows_checked": 0, "rows_lost": 0, "rows_duplicated": 0,
             "kill_to_running_s": [], "kills": 0, "sigterm_exit_s": None, "redis_restart_s": None,
             "s3_freeze_s": None, "bad_input_cases": {}, "bad_input_worker_deaths": 0}


class Cluster:
    def __init__(self, tmp, model):
        self.tmp, self.model = tmp, model
        os.makedirs(os.path.join(tmp, "redis"), exist_ok=True)
        self.redis = RedisAOF(os.path.join(tmp, "redis"))
        self.moto = Moto()
        self.workers: list = []
        self.n = 0
        self.rng = random.Random(SEED)

    def start(self):
        self.redis.start()
        self.moto.start()
        self.env = dict(os.environ, PREFIXQ_REDIS_URL=self.redis.url, PREFIXQ_STORE_URL="s3://chaos/batch",
                        PREFIXQ_S3_ENDPOINT=self.moto.url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                        AWS_DEFAULT_REGION="us-east-1", PREFIXQ_REAP_GRACE_S="3", PREFIXQ_HEARTBEAT_TTL_S="2",
                        PREFIXQ_HEARTBEAT_S="0.5", PREFIXQ_REAP_INTERVAL_S="1", PREFIXQ_MAX_ATTEMPTS="50",
                        PREFIXQ_S3_READ_TIMEOUT="2", PREFIXQ_S3_CONNECT_TIMEOUT="2", PREFIXQ_S3_MAX_ATTEMPTS="2",
                        PREFIXQ_STORE_OUTAGE_S="60", PREFIXQ_DRAIN_SECONDS="5", PREFIXQ_LOG_LEVEL="INFO",
                        PREFIXQ_REDIS_RETRIES="40", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                        TOKENIZERS_PARALLELISM="false")  # several workers share 2 CI cores
        os.environ.update({k: self.env[k] for k in ("PREFIXQ_S3_ENDPOINT", "AWS_ACCESS_KEY_ID",
                                                    "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        boto3.client("s3", endpoint_url=self.moto.url, region_name="us-east-1").create_bucket(Bucket="chaos")
        self.client = Client(redis_url=self.redis.url, store_url="s3://chaos/batch")

    def add_worker(self):
        self.n += 1
        w = start_worker(self.env, self.model, self.tmp, self.n)
        self.workers.append(w)
        return w

    def by_name(self, name: str):
        pid = int(str(name).rsplit("-", 1)[-1]) if name else -1
        return next((w for w in self.workers if w.pid == pid and w.alive()), None)

    def stop(self):
        for w in self.workers:
            if w.alive():
                w.proc.kill()
                w.proc.wait(10)
        self.moto.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    c = Cluster(str(tmp_path_factory.mktemp("chaos")), tiny_model)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def job_file(path, n, tag, max_tokens=24):
    rows = [{"custom_id": f"{tag}-{i}", "prompt": f"{tag} row {i}: the answer is", "max_tokens": max_tokens,
             "temperature": 0} for i in range(n)]
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), [r["custom_id"] for r in rows]


def wait_until(pred, timeout, what, poll=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_done(c: Cluster, jobs: dict, timeout=240):
    def all_done():
        return all(c.client.status(j)["status"] in state.TERMINAL for j in jobs)
    try:
        wait_until(all_done, timeout, "jobs to finish", poll=0.5)
    except AssertionError:
        for w in c.workers:
            print(f"--- worker {w.pid} alive={w.alive()}\n{w.log()[-3000:]}")
        raise


def verify(c: Cluster, jobs: dict) -> None:
    """Each accepted row has exactly one result; counts go into the figures."""
    for job_id, expected in jobs.items():
        rec = c.client.status(job_id)
        assert rec["status"] == "succeeded", (job_id, rec["status"], rec.get("error"), rec.get("attempt_reasons"))
        got = [json.loads(x)["custom_id"] for x in c.client.store.get_bytes(rec["results_key"]).decode().splitlines()]
        FIG["rows_lost"] += len(set(expected) - set(got))
        FIG["rows_duplicated"] += len(got) - len(set(got))
        FIG["rows_checked"] += len(expected)
        FIG["jobs_completed"] += 1
        assert got == expected, job_id


def running_job(c: Cluster, jobs):
    for j in jobs:
        rec = c.client.status(j)
        if rec["status"] == "running" and rec["heartbeat_alive"] and rec.get("done", 0) > 0 and c.by_name(rec["worker"]):
            return j, rec
    return None


def test_sigkill_workers_at_random_points(cluster):
    c = cluster
    jobs = {}

    def keep_two_unfinished():
        # jobs finish fast on an idle machine: keep work around for the next kill
        while sum(c.client.status(j)["status"] not in state.TERMINAL for j in jobs) < 2:
            path, ids = job_file(os.path.join(c.tmp, f"kill-{len(jobs)}.jsonl"), 120, f"k{len(jobs)}", max_tokens=24)
            jobs[c.client.submit(path, output_format="jsonl")] = ids
    keep_two_unfinished()
    for _ in range(3):  # a spare worker picks a reaped job up while the replacement loads its model
        c.add_worker()
    tries = 0
    while FIG["kills"] < KILLS and tries < 4 * KILLS:  # a job may finish before its kill lands: try again
        tries += 1
        keep_two_unfinished()
        job, rec = wait_until(lambda: running_job(c, jobs), 120, "a running job with committed rows")
        time.sleep(c.rng.uniform(0.0, 1.0))
        rec = c.client.status(job)
        victim = c.by_name(rec["worker"])
        if rec["status"] != "running" or victim is None:
            continue
        before = rec["attempts"]
        victim.proc.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        victim.proc.wait(10)
        FIG["kills"] += 1
        c.add_worker()

        def again():
            r = c.client.status(job)
            return r["status"] == "succeeded" or (r["status"] == "running" and r["attempts"] > before)
        wait_until(again, 120, f"job {job} running again after the kill")
        FIG["kill_to_running_s"].append(round(time.monotonic() - t_kill, 2))
        reasons = c.client.status(job)["attempt_reasons"]
        assert any(x["kind"] == "worker_lost" for x in reasons) or c.client.status(job)["status"] == "succeeded"
    wait_done(c, jobs)
    verify(c, jobs)
    assert FIG["kills"] >= KILLS - 1


def test_sigterm_drains_and_requeues(cluster):
    c = cluster
    path, ids = job_file(os.path.join(c.tmp, "term.jsonl"), 300, "term", max_tokens=32)
    job = c.client.submit(path, output_format="jsonl")
    _, rec = wait_until(lambda: running_job(c, [job]), 120, "the job to run")
    victim = c.by_name(rec["worker"])
    t0 = time.monotonic()
    victim.proc.send_signal(signal.SIGTERM)
    assert victim.proc.wait(30) == 0, victim.log()[-2000:]
    FIG["sigterm_exit_s"] = round(time.monotonic() - t0, 2)
    c.add_worker()
    wait_done(c, {job: ids})
    reasons = c.client.status(job)["attempt_reasons"]
    assert "drained" in [x["kind"] for x in reasons]
    assert state.failures_since_retry(reasons) == 0  # a graceful stop is not a failed attempt
    verify(c, {job: ids})


def test_redis_restart_with_aof_mid_job(cluster):
    c = cluster
    path, ids = job_file(os.path.join(c.tmp, "redis.jsonl"), 300, "redis", max_tokens=32)
    job = c.client.submit(path, output_format="jsonl")
    wait_until(lambda: running_job(c, [job]), 120, "the job to run")
    t0 = time.monotonic()
    c.redis.stop()
    time.sleep(1.0)
    c.redis.start()
    FIG["redis_restart_s"] = round(time.monotonic() - t0, 2)
    wait_done(c, {job: ids})
    verify(c, {job: ids})
    assert all(w.alive() for w in c.workers if w.proc.returncode is None)


def test_s3_frozen_10s_during_commits(cluster):
    c = cluster
    path, ids = job_file(os.path.join(c.tmp, "s3.jsonl"), 400, "s3", max_tokens=32)
    job = c.client.submit(path, output_format="jsonl")
    wait_until(lambda: running_job(c, [job]), 120, "the job to run")
    c.moto.freeze()
    t0 = time.monotonic()
    try:
        time.sleep(10)
        st = c.client.status(job)
        assert st["status"] in ("running", "succeeded"), st  # paused, not failed
    finally:
        c.moto.thaw()
    FIG["s3_freeze_s"] = round(time.monotonic() - t0, 2)
    wait_done(c, {job: ids})
    verify(c, {job: ids})
    assert any("pausing the job" in w.log() for w in c.workers)


SUBMITTER = """
import json, os, sys
from jobs.client import Client
c = Client()
tag, n, d = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for i in range(n):
    p = os.path.join(d, f"{tag}-{i}.jsonl")
    with open(p, "w") as f:
        for k in range(3):
            f.write(json.dumps({"custom_id": f"{tag}-{i}-{k}", "prompt": f"small {i} {k}", "max_tokens": 4}) + "\\n")
    print(c.submit(p, output_format="jsonl"), flush=True)
"""


def test_many_small_jobs_from_four_processes(cluster):
    c = cluster
    while sum(w.alive() for w in c.workers) < 3:
        c.add_worker()
    per = SMALL_JOBS // 4
    procs = [subprocess.Popen([sys.executable, "-c", SUBMITTER, f"s{p}", str(per), c.tmp], env=c.env,
                              stdout=subprocess.PIPE, text=True) for p in range(4)]
    jobs = {}
    for p, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0
        ids = out.split()
        assert len(ids) == per
        for i, j in enumerate(ids):
            jobs[j] = [f"s{p}-{i}-{k}" for k in range(3)]
    wait_done(c, jobs, timeout=300)
    verify(c, jobs)


def _bad_cases(d):
    """(kind, file, expect) with expect 'refused' (file-level) or a set of custom_ids that must fail."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    cases = []

    def jl(name, lines):
        p = os.path.join(d, name)
        with open(p, "wb") as f:
            f.write(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
        return p
    ok = {"custom_id": "ok", "prompt": "fine", "max_tokens": 3}
    cases.append(("invalid_utf8", jl("utf8.jsonl", [ok, b'{"custom_id": "x", "prompt": "\xff\xfe"}']), "refused"))
    p = jl("trunc.jsonl", [ok, {"custom_id": "y", "prompt": "cut"}])
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 8)
    cases.append(("truncated", p, "refused"))
    cases.append(("wrong_type", jl("type.jsonl", [ok, {"custom_id": "t", "prompt": "x", "max_tokens": "ten"}]), "refused"))
    cases.append(("duplicate_ids", jl("dup.jsonl", [{"custom_id": "same", "prompt": "p"}] * 100_000), "refused"))
    pq.write_table(pa.table({"id": ["a"], "text": ["b"]}), os.path.join(d, "schema.parquet"))
    cases.append(("parquet_wrong_schema", os.path.join(d, "schema.parquet"), "refused"))
    bomb = os.path.join(d, "bomb.jsonl.gz")
    with gzip.open(bomb, "wb") as f:
        f.write(json.dumps(ok).encode() + b"\n")
        for _ in range(40):
            f.write(b" " * (1 << 20))
    cases.append(("gzip_bomb", bomb, "refused"))
    rows = [ok,
            b'{"custom_id": "nan", "prompt": "x", "temperature": NaN}',
            {"custom_id": "neg", "prompt": "x", "temperature": -1},
            {"custom_id": "huge-seed", "prompt": "x", "seed": 2 ** 70},
            {"custom_id": "huge-max", "prompt": "x", "max_tokens": 10 ** 12},
            {"custom_id": "huge-topk", "prompt": "x", "top_k": 10 ** 15, "max_tokens": 2},
            {"custom_id": "empty", "prompt": ""},
            {"custom_id": "mb", "prompt": "word " * (1 << 18)},
            {"custom_id": "unknown", "prompt": "x", "max_tokens": 2, "colour": "blue", "nested": {"a": [1]}}]
    cases.append(("row_level_mix", jl("rows.jsonl", rows), {"nan", "neg", "huge-seed", "empty", "mb"}))
    return cases


def test_bad_input_through_real_workers(cluster):
    c = cluster
    alive_before = [w for w in c.workers if w.alive()]
    env = dict(c.env, PREFIXQ_MAX_INPUT_BYTES=str(20 << 20))
    accepted = {}
    for kind, path, expect in _bad_cases(c.tmp):
        p = subprocess.run([os.path.join(BIN, "prefixq"), "submit", path, "--output-format", "jsonl"], env=env,
                           capture_output=True, text=True, timeout=120)
        FIG["bad_input_cases"][kind] = FIG["bad_input_cases"].get(kind, 0) + 1
        if expect == "refused":
            assert p.returncode == 2 and "error:" in p.stderr and os.path.basename(path) in p.stderr, (kind, p.stderr)
            continue
        assert p.returncode == 0, p.stderr
        accepted[p.stdout.strip()] = expect
    for job, must_fail in accepted.items():
        wait_done(c, {job: None})
        rec = c.client.status(job)
        assert rec["status"] == "succeeded"
        got = {x["custom_id"]: x for x in map(json.loads, c.client.store.get_bytes(rec["results_key"]).decode().splitlines())}
        errs = [json.loads(x)["custom_id"] for x in c.client.store.get_bytes(rec["results_key"]).decode().splitlines()
                if json.loads(x)["finish_reason"] == "error"]
        assert set(errs) == must_fail, errs
        assert {"ok", "huge-max", "huge-topk", "unknown"} <= set(got) and len(got) == 9
        FIG["bad_input_cases"]["row_level_rows"] = len(must_fail)
    FIG["bad_input_worker_deaths"] = sum(not w.alive() for w in alive_before)
    assert FIG["bad_input_worker_deaths"] == 0


def test_zz_report():
    ks = sorted(FIG["kill_to_running_s"])
    rows = [("jobs completed", FIG["jobs_completed"]), ("rows checked", FIG["rows_checked"]),
            ("rows lost", FIG["rows_lost"]), ("rows duplicated", FIG["rows_duplicated"]),
            ("SIGKILLs", FIG["kills"]),
            ("kill -> job running again, median / max (s)",
             f"{ks[len(ks) // 2]} / {ks[-1]}" if ks else "-"),
            ("SIGTERM -> worker exit 0 (s)", FIG["sigterm_exit_s"]),
            ("Redis down+restart (s)", FIG["redis_restart_s"]), ("S3 frozen (s)", FIG["s3_freeze_s"]),
            ("bad-input cases by kind", json.dumps(FIG["bad_input_cases"], sort_keys=True)),
            ("bad-input cases that killed a worker", FIG["bad_input_worker_deaths"])]
    print("\n| figure | value |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if os.environ.get("PREFIXQ_CHAOS_REPORT"):
        with open(os.environ["PREFIXQ_CHAOS_REPORT"], "w") as f:
            json.dump(FIG, f, indent=2)
    assert FIG["rows_lost"] == 0 and FIG["rows_duplicated"] == 0
