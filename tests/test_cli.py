"""CLI behaviour that needs no model: refusals, status, cancel, ls (console scripts in subprocesses)."""
import json
import os
import subprocess
import sys

import redis

BIN = os.path.dirname(sys.executable)


def run(args, env, exe="prefixq"):
    return subprocess.run([os.path.join(BIN, exe), *args], env=env, capture_output=True, text=True, timeout=120)


def test_submit_refuses_bad_files_and_enqueues_nothing(tmp_path, redis_url):
    env = dict(os.environ, PREFIXQ_REDIS_URL=redis_url, PREFIXQ_STORE=f"file://{tmp_path}/store")
    cases = {
        "a.csv": b"custom_id,prompt\n",
        "b.jsonl": b"",
        "c.jsonl": b'{"prompt": "x"}\n',
        "d.jsonl": b'{"custom_id": "1", "prompt": "x"}\n{"custom_id": "1", "prompt": "y"}\n',
        "e.jsonl": b'{"custom_id": "1"}\n',
        "f.jsonl": b'{"custom_id": "1", "prompt": "x", "max_tokens": "lots"}\n',
        "g.jsonl": b'{"custom_id": "1", "prompt": "\xc3\x28"}\n',
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        p = run([str(tmp_path / name)], env, exe="submit")
        assert p.returncode == 2 and name in p.stderr and "error:" in p.stderr, (name, p.stderr)
        assert p.stdout == ""
    r = redis.Redis.from_url(redis_url)
    assert r.zcard("prefixq:jobs") == 0 and r.llen("rq:queue:prefixq") == 0
    assert not (tmp_path / "store" / "jobs").exists()


def test_status_cancel_ls(tmp_path, redis_url):
    env = dict(os.environ, PREFIXQ_REDIS_URL=redis_url, PREFIXQ_STORE=f"file://{tmp_path}/store")
    (tmp_path / "j.jsonl").write_text('{"custom_id": "1", "prompt": "x"}\n{"custom_id": "2", "prompt": "y"}\n')
    p = run(["submit", str(tmp_path / "j.jsonl"), "--max-tokens", "5", "--output-format", "jsonl"], env)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    st = json.loads(run(["status", job, "--json"], env).stdout)
    assert st["status"] == "queued" and st["total"] == 2 and st["settings"] == {"max_tokens": 5}
    assert st["results_key"] == f"jobs/{job}/results.jsonl"
    assert (tmp_path / "store" / "jobs" / job / "input.jsonl").exists()
    assert job in run(["ls"], env).stdout
    assert run(["cancel", job], env).returncode == 0
    assert json.loads(run(["status", job, "--json"], env).stdout)["status"] == "cancelled"
    assert run(["cancel", job], env).returncode == 1  # already finished
    assert run(["status", "nosuchjob"], env).returncode == 1
    assert run(["status", "../../etc"], env).returncode == 1
    assert run(["results", job], env).returncode == 1  # not succeeded
    assert redis.Redis.from_url(redis_url).llen("rq:queue:prefixq") == 0  # cancelled job left the queue
