"""Bad input, tried systematically with hypothesis: JSONL, Parquet and OpenAI Batch lines.

Properties:
- validation raises only JobFileError (naming the file and line/row), never anything else;
- a file-level problem (invalid UTF-8, truncation, wrong types, bad schema, duplicate ids) is
  refused as a whole; a row-level problem (sampling values, empty or too-long prompts) passes
  validation and fails only its own row at run time (`JobRunner._prepare` never raises);
- every valid row of a file is read back, in order, with its fields (unknown fields ignored).
Worker-level survival of the same cases is in tests/chaos (real worker processes).
"""
import gzip
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs import formats
from jobs.formats import JobFileError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

ident = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
prompt = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
weird_num = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10 ** 30), 10 ** 30))


def test_number_too_large_for_a_float(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text('{"custom_id": "a", "prompt": "x", "temperature": 1%s}\n' % ("0" * 400))
    with pytest.raises(JobFileError, match="line 1: field 'temperature': is too large"):
        formats.validate_file(str(p))
any_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                        max_leaves=6)


@st.composite
def native_row(draw, cid):
    row = {"custom_id": cid, "prompt": draw(prompt)}
    for name in ("temperature", "top_p"):
        if draw(st.booleans()):
            row[name] = draw(weird_num)
    for name in ("max_tokens", "top_k", "seed"):
        if draw(st.booleans()):
            row[name] = draw(st.integers(-(10 ** 20), 10 ** 20))
    if draw(st.booleans()):
        row[draw(st.sampled_from(["colour", "meta", "x_extra"]))] = draw(any_json)  # unknown field
    return row


@st.composite
def native_file(draw):
    ids = draw(st.lists(ident, min_size=1, max_size=8, unique=True))
    return [draw(native_row(cid)) for cid in ids]


def dump(rows):
    return "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows).encode()


def read_all(path):
    formats.validate_file(path)
    return list(formats.iter_rows(path))


@FAST
@given(rows=native_file())
def test_valid_rows_all_come_back_in_order(tmp_path_factory, rows):
    p = tmp_path_factory.mktemp("p") / "f.jsonl"
    p.write_bytes(dump(rows))
    got = read_all(str(p))
    assert [r["custom_id"] for r in got] == [r["custom_id"] for r in rows]
    assert [r["prompt"] for r in got] == [r["prompt"] for r in rows]
    for src, r in zip(rows, got):
        assert set(r["params"]) <= set(formats.SAMPLING_FIELDS)  # unknown fields are ignored
        for k, v in r["params"].items():
            assert v == src[k] or v == float(src[k]) or (isinstance(v, float) and math.isnan(v))


@FAST
@given(rows=native_file(), cut=st.integers(1, 50), junk=st.binary(min_size=1, max_size=8))
def test_damaged_files_raise_only_job_file_errors(tmp_path_factory, rows, cut, junk):
    data = dump(rows)
    d = tmp_path_factory.mktemp("d")
    for name, blob in (("trunc.jsonl", data[:-min(cut, len(data) - 1)]),
                       ("junk.jsonl", data + junk + b"\n"),
                       ("utf8.jsonl", data + b'{"custom_id": "z", "prompt": "\xc3\x28"}\n')):
        (d / name).write_bytes(blob)
        try:
            read_all(str(d / name))
        except JobFileError as e:
            assert name in str(e) and ("line" in str(e) or "empty" in str(e))
    with pytest.raises(JobFileError, match="invalid UTF-8"):
        read_all(str(d / "utf8.jsonl"))


@FAST
@given(bad=st.sampled_from([("max_tokens", "ten"), ("temperature", "hot"), ("stop", 5), ("prompt", 7),
                            ("messages", "hi"), ("custom_id", ["x"]), ("top_k", 1.5), ("seed", [1])]),
       rows=native_file(), at=st.integers(0, 7))
def test_wrong_types_are_refused_with_line_and_field(tmp_path_factory, bad, rows, at):
    field, value = bad
    at = at % len(rows)
    rows[at] = {**rows[at], field: value}
    if field == "messages":
        rows[at].pop("prompt", None)
    p = tmp_path_factory.mktemp("w") / "w.jsonl"
    p.write_bytes(dump(rows))
    with pytest.raises(JobFileError) as e:
        read_all(str(p))
    assert f"line {at + 1}" in str(e.value)


@FAST
@given(body=st.dictionaries(st.sampled_from(["messages", "prompt", "max_tokens", "temperature", "top_p", "model",
                                             "max_completion_tokens", "n"]), any_json, max_size=5),
       url=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", None]))
def test_openai_lines_never_crash_validation(tmp_path_factory, body, url):
    line = {"custom_id": "a", "method": "POST", "url": url, "body": body}
    p = tmp_path_factory.mktemp("o") / "o.jsonl"
    p.write_bytes(dump([line]))
    try:
        rows = read_all(str(p))
    except JobFileError as e:
        assert "line 1" in str(e)
    else:
        assert rows[0]["endpoint"] == url and (rows[0]["prompt"] is not None or rows[0]["messages"])


@FAST
@given(cols=st.dictionaries(st.sampled_from(["custom_id", "prompt", "text", "id", "max_tokens", "messages"]),
                            st.sampled_from([pa.string(), pa.int64(), pa.float64()]), min_size=1, max_size=4))
def test_parquet_schemas(tmp_path_factory, cols):
    values = {pa.string(): "v", pa.int64(): 3, pa.float64(): 1.5}
    table = pa.table({k: pa.array([values[t], values[t]], type=t) for k, t in cols.items()})
    p = tmp_path_factory.mktemp("q") / "q.parquet"
    pq.write_table(table, p)
    try:
        rows = read_all(str(p))
    except JobFileError as e:
        assert "q.parquet" in str(e)
    else:
        assert "custom_id" in cols and len(rows) == 2


def test_parquet_wrong_schema_and_garbage(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "text": ["b"]}), tmp_path / "s.parquet")
    with pytest.raises(JobFileError, match="no 'custom_id' column"):
        read_all(str(tmp_path / "s.parquet"))
    (tmp_path / "g.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(JobFileError, match="unreadable Parquet"):
        read_all(str(tmp_path / "g.parquet"))


def test_100k_duplicate_ids_refused_fast(tmp_path):
    p = tmp_path / "dup.jsonl"
    p.write_text('{"custom_id": "same", "prompt": "p"}\n' * 100_000)
    with pytest.raises(JobFileError, match="line 2: field 'custom_id': duplicate"):
        formats.validate_file(str(p))


def test_gzip_bomb_and_truncated_gzip(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXQ_MAX_INPUT_BYTES", str(4 << 20))
    bomb = tmp_path / "bomb.jsonl.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(b'{"custom_id": "a", "prompt": "x"}\n')
        for _ in range(32):
            f.write(b"\n" * (1 << 20))
    assert bomb.stat().st_size < 200_000
    with pytest.raises(JobFileError, match="gzip bomb"):
        formats.validate_file(str(bomb))
    good = tmp_path / "ok.jsonl.gz"
    with gzip.open(good, "wb") as f:
        f.write(b"".join(b'{"custom_id": "r%d", "prompt": "x"}\n' % i for i in range(200)))
    assert formats.validate_file(str(good))["rows"] == 200
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(JobFileError, match="cut.jsonl.gz"):
        formats.validate_file(str(cut))


def test_line_size_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXQ_MAX_LINE_BYTES", "1000")
    p = tmp_path / "long.jsonl"
    p.write_text('{"custom_id": "a", "prompt": "x"}\n' + json.dumps({"custom_id": "b", "prompt": "y" * 5000}) + "\n")
    with pytest.raises(JobFileError, match="line 2: line is longer than 1000 bytes"):
        formats.validate_file(str(p))


# -- row level: _prepare never raises, and bad values fail only their row -------------------------
@pytest.fixture(scope="module")
def prep(tiny_model):
    from jobs import state  # noqa: F401
    from worker import runner
    from worker.engine_factory import make_engine
    eng, _ = make_engine("paged", tiny_model, device="cpu", max_num_seqs=4)
    ctx = runner.WorkerContext(engine=eng, engine_kind="paged", model="tiny", redis=None)
    jr = runner.JobRunner.__new__(runner.JobRunner)
    jr.ctx = ctx
    return jr, eng


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=native_file())
def test_prepare_never_raises_and_engine_accepts_what_passes(prep, rows):
    jr, eng = prep
    for i, src in enumerate(rows):
        row = {"index": i, "custom_id": src["custom_id"], "prompt": src["prompt"], "messages": None,
               "params": {k: src[k] for k in formats.SAMPLING_FIELDS if k in src}}
        p = jr._prepare(row, {})
        if p.error:
            assert isinstance(p.error, str) and p.error
            continue
        # what passes must run through the real engine without raising (2 tokens: keep it quick)
        p.params.max_tokens = min(p.params.max_tokens, 2)
        eng.add_request(f"h{i}", p.prompt_token_ids, p.params)
    while eng.has_unfinished():
        eng.step()


def test_row_level_values(prep):
    jr, _ = prep
    cases = {"nan": {"temperature": float("nan")}, "neg": {"temperature": -1.0}, "inf": {"top_p": float("inf")},
             "seed": {"seed": 2 ** 70}, "zero_max": {"max_tokens": 0}}
    for name, params in cases.items():
        p = jr._prepare({"index": 0, "custom_id": name, "prompt": "hi", "messages": None, "params": params}, {})
        assert p.error and "invalid sampling value" in p.error, name
    p = jr._prepare({"index": 0, "custom_id": "e", "prompt": "", "messages": None, "params": {}}, {})
    assert p.error and ("empty" in p.error or "context" in p.error)
    p = jr._prepare({"index": 0, "custom_id": "mb", "prompt": "word " * 200_000, "messages": None, "params": {}}, {})
    assert p.error and "context" in p.error
    p = jr._prepare({"index": 0, "custom_id": "big", "prompt": "hi", "messages": None,
                     "params": {"max_tokens": 10 ** 12, "top_k": 10 ** 15}}, {})
    assert p.error is None and p.params.max_tokens < 128 and p.params.top_k == 0
