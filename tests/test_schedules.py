"""Schedules: templates, management, the per-period claim, and two real `prefixq scheduler`
processes firing one schedule: each period is submitted exactly once."""
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from jobs import schedules, state
from jobs.schedules import Schedule

BIN = os.path.dirname(sys.executable)


def test_render_input_dates():
    period = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
    local = period.astimezone()
    got = schedules.render_input("s3://b/evals/{date}/*.parquet|{yesterday}", period)
    yday = datetime.fromordinal(local.toordinal() - 1).strftime("%Y-%m-%d")
    assert got == f"s3://b/evals/{local:%Y-%m-%d}/*.parquet|{yday}"
    with pytest.raises(ValueError, match="template"):
        schedules.render_input("s3://b/{today}.jsonl", period)


def test_validate_refuses_bad_schedules():
    with pytest.raises(ValueError, match="cron"):
        Schedule("n1", "not a cron", "x.jsonl").validate()
    with pytest.raises(ValueError, match="name"):
        Schedule("bad name!", "0 2 * * *", "x.jsonl").validate()
    with pytest.raises(ValueError, match="template"):
        Schedule("n1", "0 2 * * *", "{nope}.jsonl").validate()
    with pytest.raises(ValueError, match="options"):
        Schedule("n1", "0 2 * * *", "x.jsonl", options={"bogus": 1}).validate()


def test_add_list_remove_cli(redis_url, tmp_path):
    env = dict(os.environ, PREFIXQ_REDIS_URL=redis_url)
    run = lambda *a: subprocess.run([os.path.join(BIN, "prefixq"), *a], env=env, capture_output=True,  # noqa: E731
                                    text=True, timeout=60)
    p = run("schedule", "add", "--cron", "0 2 * * *", "--name", "nightly-eval", "s3://bkt/evals/{date}/*.parquet",
            "--max-tokens", "16")
    assert p.returncode == 0, p.stderr
    assert run("schedule", "add", "--cron", "0 2 * * *", "--name", "nightly-eval", "x.jsonl").returncode == 2
    p = run("schedule", "list")
    assert "nightly-eval" in p.stdout and "0 2 * * *" in p.stdout and "{date}" in p.stdout
    stored = schedules.list_all(state.connect(redis_url))
    assert [(s.name, s.options) for s in stored] == [("nightly-eval", {"max_tokens": 16})]
    assert run("schedule", "remove", "nightly-eval").returncode == 0
    assert run("schedule", "remove", "nightly-eval").returncode == 1
    assert schedules.list_all(state.connect(redis_url)) == []


def _inputs(tmp_path, n_files=2):
    day = datetime.now().astimezone().strftime("%Y-%m-%d")
    d = tmp_path / "evals" / day
    d.mkdir(parents=True)
    for i in range(n_files):
        (d / f"part{i}.jsonl").write_text("".join(json.dumps({"custom_id": f"{i}-{k}", "prompt": "hi"}) + "\n"
                                                  for k in range(3)))
    (d / "notes.txt").write_text("not an input")
    return "file://" + str(tmp_path / "evals") + "/{date}/*.jsonl"


def test_fire_claims_each_period_once(redis_url, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXQ_STORE", f"file://{tmp_path}/store")
    r = state.connect(redis_url)
    sched = Schedule("nightly", "0 2 * * *", _inputs(tmp_path), options={"max_tokens": 4}).validate()
    period = datetime.now(timezone.utc).replace(microsecond=0)  # today's tick: the folder exists
    first = schedules.fire(r, sched, period, redis_url=redis_url, scheduler="a")
    assert first is not None and len(first) == 2  # one job per matched object, notes.txt skipped
    assert schedules.fire(r, sched, period, redis_url=redis_url, scheduler="b") is None
    assert {state.get(r, j)["source_name"] for j in first} == {"part0.jsonl", "part1.jsonl"}
    assert state.get(r, first[0])["settings"] == {"max_tokens": 4}
    # a period whose input is missing is recorded as an error, and the scheduler goes on
    gone = Schedule("gone", "0 2 * * *", "file://" + str(tmp_path) + "/none/{date}/*.jsonl").validate()
    assert schedules.fire(r, gone, period, redis_url=redis_url, scheduler="a") == []
    assert "no object matches" in schedules.recent_runs(r, "gone")[0]["error"]


def test_two_scheduler_processes_enqueue_once_per_period(redis_url, tmp_path):
    env = dict(os.environ, PREFIXQ_REDIS_URL=redis_url, PREFIXQ_STORE=f"file://{tmp_path}/store")
    r = state.connect(redis_url)
    schedules.add(r, Schedule("every2s", "* * * * * */2", _inputs(tmp_path)))  # croniter's 6th field: seconds
    procs = [subprocess.Popen([os.path.join(BIN, "prefixq"), "scheduler", "--name", f"s{i}", "--poll", "1"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        time.sleep(9)
        assert all(p.poll() is None for p in procs)
        # rq's registry knows both schedulers
        assert set(r.zrange("rq:cron_schedulers", 0, -1)) >= {"s0", "s1"}
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=20)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    runs = schedules.recent_runs(r, "every2s", 50)
    periods = [x["period"] for x in runs]
    assert len(periods) >= 3, logs
    assert len(set(periods)) == len(periods), periods  # no period fired twice
    assert all(x["error"] == "" and len(x["jobs"]) == 2 for x in runs), runs
    jobs = r.zrange("prefixq:jobs", 0, -1)
    assert sorted(jobs) == sorted(j for x in runs for j in x["jobs"])
    assert len(jobs) == 2 * len(periods)
    # both processes woke for the same ticks: the losers logged the claim they lost
    assert sum(log.count("already fired elsewhere") for log in logs) >= len(periods) - 1, logs
