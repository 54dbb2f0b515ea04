"""End to end through the real CLI: `prefixq submit` (subprocess) -> real redis-server -> a real
`prefixq worker --burst` process on the real SmolLM2 model -> results in a moto S3 bucket,
checked with plain boto3."""
import io
import json
import os
import subprocess
import sys

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest



def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

BIN = os.path.dirname(sys.executable)


def cli(*args, env, timeout=120, check=True):
    p = subprocess.run([os.path.join(BIN, "prefixq"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"prefixq {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.mark.slow
def test_end_to_end_parquet_and_openai(tmp_path, redis_url, s3_server, s3_bucket, smollm2_path):
    env = dict(os.environ, PREFIXQ_REDIS_URL=redis_url, PREFIXQ_STORE=f"s3://{s3_bucket}/batch",
               PREFIXQ_S3_ENDPOINT=s3_server, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", PREFIXQ_LOG_LEVEL="INFO")
    sysmsg = {"role": "system", "content": "You are a concise assistant."}
    rows = [
        {"custom_id": "chat-capital", "prompt": None,
         "messages": [sysmsg, {"role": "user", "content": "What is the capital of France?"}], "max_tokens": None,
         "temperature": None, "stop": None},
        {"custom_id": "chat-color", "prompt": None,
         "messages": [sysmsg, {"role": "user", "content": "Name a color."}], "max_tokens": 4, "temperature": 0.8,
         "stop": None},
        {"custom_id": "plain-count", "prompt": "1, 2, 3, 4,", "messages": None, "max_tokens": 10,
         "temperature": None, "stop": ["7"]},
        {"custom_id": "plain-story", "prompt": "Once upon a time", "messages": None, "max_tokens": None,
         "temperature": None, "stop": None},
        {"custom_id": "bad-temp", "prompt": "x", "messages": None, "max_tokens": None, "temperature": -1.0,
         "stop": None},
        {"custom_id": "too-long", "prompt": "hello " * 9000, "messages": None, "max_tokens": None,
         "temperature": None, "stop": None},
    ]
    schema = pa.schema([("custom_id", pa.string()), ("prompt", pa.string()),
                        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("max_tokens", pa.int64()), ("temperature", pa.float64()), ("stop", pa.list_(pa.string()))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "job.parquet")
    openai_lines = [
        {"custom_id": "oa-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6}},
        {"custom_id": "oa-2", "method": "POST", "url": "/v1/completions",
         "body": {"model": "smollm2", "prompt": "The sky is", "max_tokens": 5, "temperature": 0}},
        {"custom_id": "oa-bad", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "x"}], "top_p": 5}},
    ]
    (tmp_path / "batch.jsonl").write_text("".join(json.dumps(x) + "\n" for x in openai_lines))

    # a bad file is refused at submit with its row, and nothing is enqueued
    (tmp_path / "bad.jsonl").write_text('{"custom_id": "a", "prompt": "x"}\n{"custom_id": "a", "prompt": "y"}\n')
    bad = cli("submit", str(tmp_path / "bad.jsonl"), env=env, check=False)
    assert bad.returncode != 0 and "line 2" in bad.stderr and "duplicate" in bad.stderr

    j1 = cli("submit", str(tmp_path / "job.parquet"), "--max-tokens", "6", "--temperature", "0", env=env).stdout.strip()
    j2 = subprocess.run([os.path.join(BIN, "submit"), str(tmp_path / "batch.jsonl")], env=env, capture_output=True,
                        text=True, timeout=120, check=True).stdout.strip()
    assert cli("status", j1, env=env).stdout.count("queued") == 1
    assert j1 in cli("ls", env=env).stdout

    port = free_port()
    w = subprocess.run([os.path.join(BIN, "prefixq"), "worker", "--burst", "--engine", "hf", "--metrics-port", str(port)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert w.returncode == 0, w.stderr[-4000:]

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")

    def get(key):
        return s3.get_object(Bucket=s3_bucket, Key=f"batch/jobs/{key}")["Body"].read()

    st = json.loads(cli("status", j1, "--json", env=env).stdout)
    assert st["status"] == "succeeded" and st["done"] == 4 and st["failed"] == 2, st
    res = pq.read_table(io.BytesIO(get(f"{j1}/results.parquet"))).to_pylist()
    assert [r["custom_id"] for r in res] == [r["custom_id"] for r in rows]
    by = {r["custom_id"]: r for r in res}
    for cid in ("chat-capital", "chat-color", "plain-count", "plain-story"):
        r = by[cid]
        assert r["finish_reason"] in ("stop", "length") and r["error"] is None and r["latency_ms"] >= 0
        assert r["text"].strip() and r["prompt_tokens"] > 0 and 1 <= r["completion_tokens"] <= 10
    assert "Paris" in by["chat-capital"]["text"]
    assert by["chat-color"]["completion_tokens"] <= 4
    assert "7" not in by["plain-count"]["text"]
    assert by["bad-temp"]["finish_reason"] == "error" and "temperature" in by["bad-temp"]["error"]
    assert by["too-long"]["finish_reason"] == "error" and "context" in by["too-long"]["error"]
    man = json.loads(get(f"{j1}/manifest.json"))
    assert man["counts"] == {"total": 6, "succeeded": 4, "failed": 2} and man["model"] == "smollm2"
    assert man["engine"] == "hf" and "prefix_cache_hit_rate" in man
    assert get(f"{j1}/input.parquet")[:4] == b"PAR1"

    st2 = json.loads(cli("status", j2, "--json", env=env).stdout)
    assert st2["status"] == "succeeded" and st2["done"] == 2 and st2["failed"] == 1
    ok = [json.loads(x) for x in get(f"{j2}/results.jsonl").decode().splitlines()]
    errs = [json.loads(x) for x in get(f"{j2}/errors.jsonl").decode().splitlines()]
    assert [x["custom_id"] for x in ok] == ["oa-1", "oa-2"]
    assert ok[0]["response"]["status_code"] == 200 and ok[0]["error"] is None
    assert ok[0]["response"]["body"]["object"] == "chat.completion"
    assert ok[0]["response"]["body"]["choices"][0]["message"]["content"].strip()
    assert ok[1]["response"]["body"]["object"] == "text_completion" and ok[1]["response"]["body"]["choices"][0]["text"]
    assert ok[1]["response"]["body"]["usage"]["completion_tokens"] <= 5
    assert [x["custom_id"] for x in errs] == ["oa-bad"] and "top_p" in errs[0]["error"]["message"]

    # `prefixq results` downloads the same bytes
    out = tmp_path / "r.parquet"
    cli("results", j1, "-o", str(out), env=env)
    assert out.read_bytes() == get(f"{j1}/results.parquet")
    table = cli("results", j1, "-o", str(tmp_path / "r2.parquet"), "--print", env=env).stdout
    assert "chat-capital" in table and "Paris" in table
