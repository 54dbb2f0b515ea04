"""Several queued jobs run through one engine session (worker.job_batch): real redis, the tiny model."""
from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest

from engine.llm_engine import LLMEngine
from jobs import state
from jobs.client import Client
from worker import job_batch, runner
from worker.metrics import Metrics

SYSTEM = ("You are a careful assistant for the prefixq batch service. Answer briefly, cite nothing, "
          "and never repeat the question. ") * 2


@pytest.fixture(scope="module")
def paged_engine(tiny_model):
    return LLMEngine(tiny_model, device="cpu", max_num_seqs=4, num_gpu_blocks_override=96)


@pytest.fixture
def ctx(paged_engine, redis_url):
    c = runner.WorkerContext(engine=paged_engine, engine_kind="paged", model="tiny", redis=state.connect(redis_url),
                             metrics=Metrics(), window=4, max_inflight=4, shard_rows=3, shard_seconds=60,
                             heartbeat_seconds=0.2)
    c.max_batch_jobs = 8
    runner.set_context(c)
    yield c
    runner.set_context(None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def job_rows(tag: str, n: int) -> list[dict]:
    return [{"custom_id": f"{tag}{i}", "prompt": f"{SYSTEM} Question {tag}-{i}: what is {i} plus {i}?",
             "max_tokens": 3, "temperature": 0} for i in range(n)]


def results(store, rec):
    return pq.read_table(io.BytesIO(store.get_bytes(rec["results_key"]))).to_pylist()


def test_two_jobs_one_session(ctx, redis_url, tmp_path, paged_engine):
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    rows_a = job_rows("a", 7)
    rows_b = job_rows("b", 6)
    rows_b[2] = {"custom_id": "bad", "prompt": "word " * 400}  # longer than the tiny model's context
    ja = c.submit(write_jsonl(tmp_path / "a.jsonl", rows_a))
    jb = c.submit(write_jsonl(tmp_path / "b.jsonl", rows_b))
    other = c.submit(write_jsonl(tmp_path / "o.jsonl", job_rows("o", 2)), model="another-model")
    seen_jobs = []
    real_step = job_batch.BatchSession._step_engine

    def spy(self):
        seen_jobs.append({f.partition("/")[0] for f in self.in_engine})
        return real_step(self)

    job_batch.BatchSession._step_engine = spy
    stats0 = paged_engine.stats()
    try:
        out = runner.run_job(ja)  # rq hands the worker job a; job b comes along, the other model's job stays
    finally:
        job_batch.BatchSession._step_engine = real_step
    assert out["status"] == "succeeded"
    # both jobs shared engine steps: one session
    assert any({ja, jb} <= s for s in seen_jobs)
    ra, rb = c.status(ja), c.status(jb)
    assert ra["status"] == "succeeded" and rb["status"] == "succeeded"
    assert (ra["done"], ra["failed"]) == (7, 0) and (rb["done"], rb["failed"]) == (5, 1)
    # each job's results are complete and in its own input order
    got_a, got_b = results(c.store, ra), results(c.store, rb)
    assert [r["custom_id"] for r in got_a] == [r["custom_id"] for r in rows_a]
    assert [r["custom_id"] for r in got_b] == [r["custom_id"] for r in rows_b]
    assert all(r["finish_reason"] in ("stop", "length") and r["error"] is None for r in got_a)
    by_b = {r["custom_id"]: r for r in got_b}
    assert by_b["bad"]["finish_reason"] == "error" and "context" in by_b["bad"]["error"]
    assert all(r["finish_reason"] in ("stop", "length") for cid, r in by_b.items() if cid != "bad")
    # the incompatible job is still queued, untouched
    assert c.status(other)["status"] == "queued"
    # per-job manifests with per-job counters; cache hits span the jobs
    ma = json.loads(c.store.get_bytes(ra["manifest_key"]))
    mb = json.loads(c.store.get_bytes(rb["manifest_key"]))
    assert ma["counts"] == {"total": 7, "succeeded": 7, "failed": 0}
    assert mb["counts"] == {"total": 6, "succeeded": 5, "failed": 1}
    for m, n in ((ma, 7), (mb, 5)):
        assert m["engine_stats"]["finished"] >= n
        assert 0 < m["prefix_cache_hit_rate"] < 1
    assert ma["engine_stats"]["prompt_tokens"] == sum(r["prompt_tokens"] for r in got_a)
    assert mb["engine_stats"]["prompt_tokens"] == sum(r["prompt_tokens"] for r in got_b if r["error"] is None)
    stats1 = paged_engine.stats()
    total_cached = ma["engine_stats"]["cached_tokens"] + mb["engine_stats"]["cached_tokens"]
    assert total_cached == stats1["cached_tokens"] - stats0["cached_tokens"]
    # the system prompt is computed about once for both jobs: far more hits than one job alone could give
    sys_blocks = len(paged_engine.tokenizer(SYSTEM)["input_ids"]) // 16
    assert total_cached >= (7 + 5 - 4) * sys_blocks * 16 - 16 * 12  # all but the first wave hit it
    assert mb["engine_stats"]["cached_tokens"] > 0 and ma["engine_stats"]["cached_tokens"] > 0


def test_cross_job_hits_are_counted_per_job(paged_engine):
    """Rows of two jobs with one shared prefix: ordered together, each job's counters are its own."""
    paged_engine.block_manager.reset_prefix_cache()
    s = job_batch.BatchSession(paged_engine, max_inflight=4, window_rows=100, gather_seconds=0.5)
    ea, eb = s.join("jobA1"), s.join("jobB1")
    from engine.sampling_params import SamplingParams
    p = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, detokenize=False)
    shared = list(range(1000, 1064))  # four full blocks
    for i in range(3):
        ea.add_request(str(i), shared + [2000 + i] * 5, p)
        eb.add_request(str(i), shared + [3000 + i] * 5, p)
    got = {"jobA1": [], "jobB1": []}
    while len(got["jobA1"]) < 3 or len(got["jobB1"]) < 3:
        got["jobA1"] += ea.step() if len(got["jobA1"]) < 3 else []
        got["jobB1"] += eb.step() if len(got["jobB1"]) < 3 else []
    assert sorted(o.request_id for o in got["jobA1"]) == ["0", "1", "2"]
    sa, sb = ea.stats(), eb.stats()
    assert sa["prompt_tokens"] == sb["prompt_tokens"] == 3 * 69
    # 6 rows share 4 blocks: computed once, the other 5 rows hit them
    assert sa["cached_tokens"] + sb["cached_tokens"] == 5 * 64
    assert set(sa["batch_jobs"].split(",")) == {"jobA1", "jobB1"}


def test_take_companions_only_queued_compatible(ctx, redis_url, tmp_path):
    c = Client(redis_url=redis_url, store_url=f"file://{tmp_path}/store")
    ids = [c.submit(write_jsonl(tmp_path / f"{i}.jsonl", job_rows(str(i), 1))) for i in range(4)]
    state.update(c.r, ids[2], cancel_requested=1)
    taken = job_batch.take_companions(ctx, ids[0], max_jobs=3)
    assert taken == [ids[1], ids[3]]
    assert job_batch.take_companions(ctx, ids[0], max_jobs=8) == []  # already taken: not in the queue
