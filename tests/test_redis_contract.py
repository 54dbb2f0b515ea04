"""The plain-Redis contract v1: spec validation, idempotent handling, takeover of a dead
consumer's entries with XAUTOCLAIM, and end to end with infra/examples/redis-cli-submit.sh
(redis-cli only) against a real redis-server and a real `prefixq worker` process."""
import json
import os
import subprocess
import sys
import time

import pytest

from jobs import redis_contract as rc
from jobs import state
from jobs.client import Client
from worker.stream_bridge import Bridge, BridgeConfig

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [{"custom_id": f"r{i}", "prompt": f"Row {i} says"} for i in range(3)]


def spec(**kw):
    d = {"version": 1, "client_id": "svc-a", "request_id": "req-1", "input": {"rows": ROWS},
         "options": {"max_tokens": 3}}
    d.update(kw)
    return {"spec": json.dumps(d)}


@pytest.mark.parametrize("fields,msg", [
    ({}, "no 'spec'"),
    ({"spec": "{not json"}, "not valid JSON"),
    (spec(version=2), "version"),
    (spec(request_id="has space"), "request_id"),
    (spec(input={"rows": []}), "non-empty"),
    (spec(input={"url": "/local/path.jsonl"}), "store URL"),
    (spec(input={"url": "s3://b/k", "rows": ROWS}), "input must be"),
    (spec(options={"max_tokens": "many"}), "wrong type"),
    (spec(options={"beam_width": 2}), "unknown option"),
    (spec(extra=1), "unknown spec fields"),
])
def test_parse_spec_refuses(fields, msg):
    with pytest.raises(rc.SpecError, match=msg):
        rc.parse_spec(fields)


def test_handle_is_idempotent_and_rejects_bad_rows(redis_url, tmp_path):
    r = state.connect(redis_url)
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    a = rc.handle_entry(r, c, "1-0", spec())
    b = rc.handle_entry(r, c, "1-0", spec())  # redelivered
    assert a["status"] == b["status"] == "accepted" and a["job_id"] == b["job_id"]
    assert r.zcard("prefixq:jobs") == 1 and r.llen("rq:queue:prefixq") == 1
    assert r.hget(rc.requests_key("svc-a"), "req-1") == a["job_id"]
    st = r.hgetall(rc.status_key(a["job_id"]))
    assert st["status"] == "queued" and st["total"] == "3" and st["request_id"] == "req-1"
    assert st["results_url"] == f"file://{tmp_path}/store/jobs/{a['job_id']}/results.parquet"
    assert r.sismember(rc.TRACKED, a["job_id"])
    # a file-level problem in the rows: rejected, no job, no mapping, a reply and a dead entry
    bad = rc.handle_entry(r, c, "2-0", spec(request_id="req-2", input={"rows": [{"custom_id": "x"}]}))
    assert bad["status"] == "rejected" and "prompt" in bad["error"]
    assert r.hget(rc.requests_key("svc-a"), "req-2") is None and r.zcard("prefixq:jobs") == 1
    replies = [f for _, f in r.xrange(rc.replies_key("svc-a"))]
    assert [x["status"] for x in replies] == ["accepted", "accepted", "rejected"]
    assert r.xlen(rc.DEAD_STREAM) == 1


def test_bridge_takes_over_a_dead_consumers_entry(redis_url, tmp_path):
    r = state.connect(redis_url)
    bridge = Bridge(redis_url, consumer="live", store_url=f"file://{tmp_path}/store",
                    cfg=BridgeConfig(block_ms=100, claim_idle_s=0.2, claim_every_s=0))
    bridge.ensure_group()
    r.xadd(rc.SUBMIT_STREAM, spec())
    # a consumer reads the entry and dies before acking
    got = r.xreadgroup(rc.GROUP, "crashed", {rc.SUBMIT_STREAM: ">"}, count=1)
    assert len(got[0][1]) == 1
    assert bridge.poll_once() == 0  # not idle long enough yet
    time.sleep(0.3)
    assert bridge.poll_once() == 1
    assert r.xpending(rc.SUBMIT_STREAM, rc.GROUP)["pending"] == 0
    job = r.hget(rc.requests_key("svc-a"), "req-1")
    assert state.get(r, job)["total"] == 3
    # status refresh follows the job record
    state.set_status(r, job, "succeeded", done=3)
    bridge._last_status = 0
    r.delete(rc.NS + "status-lock")  # held for up to 0.9 s by the previous refresh
    bridge.poll_once()
    assert r.hget(rc.status_key(job), "status") == "succeeded" and not r.sismember(rc.TRACKED, job)
    assert 0 < r.ttl(rc.status_key(job)) <= rc.STATUS_TTL_S


def _worker(env, tiny_model, *extra):
    return subprocess.Popen([os.path.join(BIN, "prefixq"), "worker", "--model", tiny_model, "--engine", "hf",
                             "--device", "cpu", "--metrics-port", "0", "--max-num-seqs", "8", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_redis_cli_script_end_to_end(redis_url, tmp_path, tiny_model):
    env = dict(os.environ, PREFIXQ_REDIS_URL=redis_url, PREFIXQ_STORE=f"file://{tmp_path}/store",
               PREFIXQ_LOG_FORMAT="json")
    # the script XADDs before any worker exists: the group reads from the stream's start
    script = subprocess.Popen(["bash", os.path.join(ROOT, "infra/examples/redis-cli-submit.sh"), "cli-test", "r-42"],
                              env=dict(env, REDIS_URL=redis_url, TIMEOUT="240", MAX_TOKENS="4"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = _worker(env, tiny_model)
    try:
        out, err = script.communicate(timeout=300)
    finally:
        worker.terminate()
        wlog = worker.communicate(timeout=30)[0]
    assert script.returncode == 0, (out, err, wlog[-3000:])
    assert "status=succeeded" in out
    r = state.connect(redis_url)
    job = r.hget(rc.requests_key("cli-test"), "r-42")
    st = r.hgetall(rc.status_key(job))
    assert st["done"] == "3" and st["failed"] == "0" and st["client_id"] == "cli-test"
    import pyarrow.parquet as pq
    path = st["results_url"][len("file://"):]
    assert [x["custom_id"] for x in pq.read_table(path).to_pylist()] == ["q1", "q2", "q3"]
    # the worker's JSON logs carry the job id
    lines = [json.loads(x) for x in wlog.splitlines() if x.startswith("{")]
    assert any(x.get("job_id") == job and "succeeded" in x["msg"] for x in lines), wlog[-3000:]
