"""`prefixq bench prefix` at a tiny scale on a tiny random model: the invariants of its figures."""
from __future__ import annotations

import json

import pytest

from bench import prefix as bench_prefix

TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 2048, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": True, "eos_token_id": 2}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    model = tmp_path_factory.mktemp("tiny-config")
    (model / "config.json").write_text(json.dumps(TINY))
    out = tmp_path_factory.mktemp("results")
    res = bench_prefix.main(["--dummy-weights", str(model), "--device", "cpu", "--scale", "0.05",
                             "--len-scale", "0.125", "--output-len", "8", "--max-num-seqs", "4",
                             "--questions-per-template", "16", "--out-dir", str(out),
                             "--name", "prefix-test"])
    res["out"] = out
    return res


def test_result_file_format(result):
    doc = json.loads((result["out"] / "prefix-test.json").read_text())
    assert {"device", "date", "commit", "command", "figures", "baseline", "workload", "details"} <= set(doc)
    for flat in (doc["figures"], doc["baseline"]):
        assert flat and all(isinstance(v, (int, float)) for v in flat.values())
    assert set(doc["details"]) == {"a", "b", "c"}
    for w in "abc":
        assert f"{w}_speedup_grouped_vs_off" in doc["figures"] and f"{w}_speedup_grouped_vs_arrival" in doc["figures"]
        assert f"{w}_off_elapsed_s" in doc["baseline"]


@pytest.mark.parametrize("w", ["a", "b", "c"])
def test_invariants(result, w):
    d = result["details"][w]
    info, modes = d["workload"], d["modes"]
    off, arr, grp = modes["off"], modes["arrival"], modes["grouped"]
    # cascade attention is off by default on the CPU, so timing "grouped" without it again is skipped
    assert "grouped_nocascade" not in modes
    for r in modes.values():
        assert r["prompt_tokens"] == info["prompt_tokens"]
        assert r["output_tokens"] == 8 * info["requests"]
        # the hit rate never beats the best possible for any order with an unbounded cache
        assert r["cached_tokens"] <= info["best_cached_tokens"]
        assert r["hit_rate"] <= info["best_hit_rate"] + 1e-9
        # prefill computed = prompt - cached, plus whatever preemption made it recompute
        assert r["prefill_tokens_computed"] == r["prompt_minus_cached_tokens"] + r["recomputed_tokens"]
        if r["preemptions"] == 0:
            assert r["recomputed_tokens"] == 0
            assert r["admissions"] == info["requests"]
            assert r["admit_hit_tokens"] == r["cached_tokens"]
    # caching off computes every prompt token (again after each preemption: the pool is small)
    assert off["prefill_tokens_computed"] == info["prompt_tokens"] + off["recomputed_tokens"]
    assert off["cached_tokens"] == 0
    assert off["hit_rate"] == 0.0 and off["bm_queries"] == 0
    # grouping never does worse than arrival order, and comes close to the best
    assert grp["hit_rate"] >= arr["hit_rate"]
    assert grp["hit_rate_of_best"] >= 0.9
    # the pool is what was asked: a fraction of the prompt tokens, but holds the longest request
    assert info["kv_blocks"] >= info["kv_blocks_running_floor"]
    assert info["cache_fraction_actual"] == pytest.approx(info["kv_blocks"] * 16 / info["prompt_tokens"])


def test_grouping_wins_where_order_matters(result):
    # RAG: 5 questions per document, the pool holds few documents; arrival order loses most reuse
    c = result["details"]["c"]["modes"]
    assert c["grouped"]["prefill_tokens_computed"] < c["arrival"]["prefill_tokens_computed"]


def test_workloads_shapes():
    # full lengths, a tenth of the groups (full scale: 1,000 / 32 x 64 / 200 x 5)
    a = bench_prefix.make_workload("a", 0.1, 1.0, 49152, 0)
    assert len(a) == 100 and all(1024 + 64 <= len(p) <= 1024 + 256 for p in a)
    assert len({tuple(p[:1024]) for p in a}) == 1
    b = bench_prefix.make_workload("b", 0.1, 1.0, 49152, 0)
    assert len(b) == 3 * 64 and len({tuple(p[:1500]) for p in b}) == 3
    assert all(1500 + 30 <= len(p) <= 1500 + 100 for p in b)
    c = bench_prefix.make_workload("c", 0.1, 1.0, 49152, 0)
    assert len(c) == 20 * 5 and len({tuple(p[:2000]) for p in c}) == 20
    assert len({tuple(p) for p in c}) == len(c)
    # shuffled: the first few requests are not all from one group
    assert len({tuple(p[:1500]) for p in b[:8]}) > 1
    assert bench_prefix.make_workload("c", 0.1, 1.0, 49152, 0) == c  # fixed seed
