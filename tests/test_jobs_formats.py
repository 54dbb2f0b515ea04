"""File-level validation of job files: every bad-input case is refused with file, row and field."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.formats import JobFileError, iter_rows, validate_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def refused(path, *needles):
    with pytest.raises(JobFileError) as ei:
        validate_file(str(path))
    msg = str(ei.value)
    assert os.path.basename(str(path)) in msg
    for n in needles:
        assert n in msg, msg
    return ei.value


def test_examples_are_valid():
    info = validate_file(os.path.join(ROOT, "examples", "prompts.parquet"))
    assert info == {"format": "parquet", "kind": "native", "rows": 20, "endpoints": []}
    rows = list(iter_rows(os.path.join(ROOT, "examples", "prompts.parquet")))
    assert sum(r["messages"] is not None for r in rows) >= 5 and sum(r["prompt"] is not None for r in rows) >= 5
    assert any(r["params"].get("stop") for r in rows)
    info = validate_file(os.path.join(ROOT, "examples", "openai_batch.jsonl"))
    assert info["kind"] == "openai" and info["endpoints"] == ["/v1/chat/completions", "/v1/completions"]


def test_jsonl_native_rows_and_params(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [
        {"custom_id": "x", "prompt": "hi", "max_tokens": 5, "temperature": 0.5, "stop": "\n", "extra": 1},
        {"custom_id": "y", "messages": [{"role": "user", "content": "yo"}], "top_k": 3.0},
        "",
    ])
    rows = list(iter_rows(p))
    assert [r["custom_id"] for r in rows] == ["x", "y"]
    assert rows[0]["params"] == {"max_tokens": 5, "temperature": 0.5, "stop": ["\n"]}
    assert rows[1]["params"] == {"top_k": 3}
    assert validate_file(p)["rows"] == 2


def test_openai_lines(tmp_path):
    p = write_jsonl(tmp_path / "b.jsonl", [
        {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                  "max_completion_tokens": 7}},
        {"custom_id": "c2", "method": "POST", "url": "/v1/completions", "body": {"prompt": "once", "max_tokens": 3}},
    ])
    rows = list(iter_rows(p))
    assert rows[0]["messages"] == [{"role": "user", "content": "hi"}] and rows[0]["params"]["max_tokens"] == 7
    assert rows[1]["prompt"] == "once" and rows[1]["endpoint"] == "/v1/completions"


def test_unknown_format(tmp_path):
    p = tmp_path / "job.csv"
    p.write_text("custom_id,prompt\n1,hi\n")
    refused(p, "unknown file format")


def test_unreadable_file(tmp_path):
    refused(tmp_path / "missing.jsonl", "not found")
    d = tmp_path / "dir.jsonl"
    d.mkdir()
    refused(d, "cannot read")
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    refused(bad, "unreadable Parquet")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    refused(p, "empty")
    p2 = tmp_path / "blank.jsonl"
    p2.write_text("\n\n  \n")
    refused(p2, "empty")
    t = pa.table({"custom_id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())})
    pq.write_table(t, tmp_path / "empty.parquet")
    refused(tmp_path / "empty.parquet", "empty")


def test_missing_custom_id(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"custom_id": "a", "prompt": "x"}, {"prompt": "y"}])
    e = refused(p, "line 2", "custom_id", "missing")
    assert e.row == 2 and e.field == "custom_id"
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "m.parquet")
    refused(tmp_path / "m.parquet", "custom_id")
    pq.write_table(pa.table({"custom_id": ["a", None], "prompt": ["x", "y"]}), tmp_path / "n.parquet")
    refused(tmp_path / "n.parquet", "row 2", "custom_id")


def test_duplicate_custom_id(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"custom_id": f"r{i}", "prompt": "x"} for i in range(50)]
                    + [{"custom_id": "r7", "prompt": "again"}])
    e = refused(p, "line 51", "duplicate", "r7")
    assert e.field == "custom_id"
    pq.write_table(pa.table({"custom_id": ["a", "b", "a"], "prompt": ["1", "2", "3"]}), tmp_path / "d.parquet")
    refused(tmp_path / "d.parquet", "row 3", "duplicate")


def test_many_rows_bounded(tmp_path):
    p = tmp_path / "big.jsonl"
    with open(p, "w") as f:
        for i in range(100_000):
            f.write('{"custom_id": "id-%d", "prompt": "p"}\n' % i)
    assert validate_file(str(p))["rows"] == 100_000


def test_neither_prompt_nor_messages(tmp_path):
    p = write_jsonl(tmp_path / "n.jsonl", [{"custom_id": "a", "max_tokens": 3}])
    refused(p, "line 1", "neither")
    pq.write_table(pa.table({"custom_id": ["a"], "text": ["x"]}), tmp_path / "n.parquet")
    refused(tmp_path / "n.parquet", "neither")
    pq.write_table(pa.table({"custom_id": ["a", "b"], "prompt": ["x", None]}), tmp_path / "n2.parquet")
    refused(tmp_path / "n2.parquet", "row 2", "neither")


@pytest.mark.parametrize("row, field", [
    ({"custom_id": "a", "prompt": 5}, "prompt"),
    ({"custom_id": "a", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"custom_id": "a", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"custom_id": "a", "prompt": "x", "stop": [1, 2]}, "stop"),
    ({"custom_id": "a", "prompt": "x", "seed": 1.5}, "seed"),
    ({"custom_id": ["a"], "prompt": "x"}, "custom_id"),
    ({"custom_id": "a", "messages": "hello"}, "messages"),
    ({"custom_id": "a", "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"custom_id": "a", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt"),
])
def test_wrong_types(tmp_path, row, field):
    p = write_jsonl(tmp_path / "t.jsonl", [{"custom_id": "ok", "prompt": "fine"}, row])
    e = refused(p, "line 2", f"'{field}'")
    assert e.field == field


def test_wrong_type_not_object(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", ["[1, 2]"])
    refused(p, "line 1", "JSON object")


def test_wrong_type_parquet(tmp_path):
    pq.write_table(pa.table({"custom_id": ["a"], "prompt": ["x"], "max_tokens": ["many"]}), tmp_path / "t.parquet")
    refused(tmp_path / "t.parquet", "row 1", "max_tokens")


def test_openai_bad_lines(tmp_path):
    base = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "x"}]}}
    for change, needle in [({"url": "/v1/embeddings"}, "url"), ({"method": "GET"}, "method"),
                           ({"body": None}, "body"), ({"body": {"model": "m"}}, "body.messages"),
                           ({"body": {"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}}, "body.max_tokens")]:
        p = write_jsonl(tmp_path / "o.jsonl", [{**base, **change}])
        refused(p, "line 1", needle)


def test_invalid_utf8(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_bytes(b'{"custom_id": "a", "prompt": "ok"}\n{"custom_id": "b", "prompt": "\xff\xfe bad"}\n')
    refused(p, "line 2", "UTF-8")


def test_truncated_line(tmp_path):
    p = tmp_path / "tr.jsonl"
    p.write_bytes(b'{"custom_id": "a", "prompt": "ok"}\n{"custom_id": "b", "prom')
    refused(p, "line 2", "truncated")
    p2 = tmp_path / "bad.jsonl"
    p2.write_bytes(b'{"custom_id": "a", "prompt": "ok"}\n{not json}\n')
    refused(p2, "line 2", "invalid JSON")


def test_row_level_values_pass_file_validation(tmp_path):
    """Invalid sampling *values* are row-level: accepted at submit, failed per row at run time."""
    p = write_jsonl(tmp_path / "v.jsonl", [{"custom_id": "a", "prompt": "x", "temperature": -1},
                                           {"custom_id": "b", "prompt": "x" * 100000}])
    assert validate_file(p)["rows"] == 2
