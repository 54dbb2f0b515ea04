"""Property tests for the prefix orderer: a permutation, groups contiguous, hit rate near the best."""
from __future__ import annotations

import random
import time
from itertools import chain

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.prefix_order import (
    PrefixTree,
    PromptRow,
    WindowedPrefixOrderer,
    interleave_jobs,
    order_by_prefix,
    prefix_stats,
    simulate_lru_hits,
)

# A tiny alphabet and a few shared stems make deep, branchy trees with many identical prefixes.
_tokens = st.lists(st.integers(0, 3), max_size=12)


@st.composite
def shared_prefix_seqs(draw, max_seqs: int = 40) -> list[list[int]]:
    stems = draw(st.lists(_tokens, min_size=1, max_size=5))
    n = draw(st.integers(0, max_seqs))
    return [draw(st.sampled_from(stems)) + draw(_tokens) for _ in range(n)]


def _identity(seq):
    return seq


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@given(shared_prefix_seqs())
def test_order_is_a_permutation(seqs):
    assert sorted(order_by_prefix(seqs, _identity)) == list(range(len(seqs)))


@given(shared_prefix_seqs())
def test_rows_sharing_any_prefix_are_contiguous(seqs):
    order = order_by_prefix(seqs, _identity)
    ordered = [seqs[i] for i in order]
    for seq in seqs:
        for p in range(len(seq) + 1):
            at = [k for k, s in enumerate(ordered) if s[:p] == seq[:p]]
            assert at == list(range(at[0], at[-1] + 1))


@given(shared_prefix_seqs())
def test_identical_prompts_keep_input_order_and_prefixes_come_first(seqs):
    order = order_by_prefix(seqs, _identity)
    pos = {row: k for k, row in enumerate(order)}
    for i, a in enumerate(seqs):
        for j, b in enumerate(seqs):
            if i < j and a == b:
                assert pos[i] < pos[j]
            if len(a) < len(b) and b[:len(a)] == a:  # a's blocks are cached before b runs
                assert pos[i] < pos[j]


@given(shared_prefix_seqs())
def test_walk_reports_common_prefix_with_previous_row(seqs):
    order, lcp = PrefixTree.build(seqs).walk()
    expected = [0] + [_common_prefix(seqs[a], seqs[b]) for a, b in zip(order, order[1:])]
    assert lcp == expected[:len(order)]


@given(shared_prefix_seqs())
def test_order_is_deterministic_and_accepts_tuples(seqs):
    as_tuples = [tuple(s) for s in seqs]
    assert order_by_prefix(seqs, _identity) == order_by_prefix(as_tuples, _identity)


def test_heavier_group_runs_first_even_if_it_arrives_later():
    light = [[1] * 8 + [i] for i in range(2)]
    heavy = [[2] * 64 + [i] for i in range(5)]
    assert order_by_prefix(light + heavy, _identity) == [2, 3, 4, 5, 6, 0, 1]


@given(shared_prefix_seqs(), st.sampled_from([1, 2, 4]))
def test_prefix_stats_counts_distinct_block_prefixes(seqs, block):
    stats = prefix_stats(seqs, block)
    distinct = {tuple(s[:k]) for s in seqs for k in range(block, len(s) + 1, block)}
    assert stats.distinct_block_tokens == len(distinct) * block
    assert stats.full_block_tokens == sum(len(s) // block * block for s in seqs)
    assert stats.prompt_tokens == sum(map(len, seqs))
    # An unbounded cache reaches the best possible in any order.
    assert simulate_lru_hits(seqs, block, capacity_blocks=10**9) == stats.best_cached_tokens


@given(shared_prefix_seqs(), st.sampled_from([1, 2, 4]), st.integers(0, 3), st.randoms())
def test_dfs_is_optimal_when_the_cache_holds_the_longest_prompt(seqs, block, slack, rnd):
    # SGLang's theorem, in our simulator: from that capacity up, DFS order reaches the best possible,
    # so no arrival order beats it.
    capacity = max([len(s) // block for s in seqs], default=0) + slack
    dfs = [seqs[i] for i in order_by_prefix(seqs, _identity)]
    arrival = seqs[:]
    rnd.shuffle(arrival)
    best = prefix_stats(seqs, block).best_cached_tokens
    assert simulate_lru_hits(dfs, block, capacity) == best
    assert simulate_lru_hits(arrival, block, capacity) <= best


# Below the longest prompt the theorem no longer applies; no counterexample has turned up (25,000
# random trials besides these), but the examples are fixed so a future one can't make CI flaky.
@given(shared_prefix_seqs(), st.sampled_from([1, 2]), st.integers(0, 6), st.randoms())
@settings(derandomize=True, max_examples=400)
def test_dfs_beats_arrival_order_with_a_cache_smaller_than_a_prompt(seqs, block, capacity, rnd):
    dfs = [seqs[i] for i in order_by_prefix(seqs, _identity)]
    arrival = seqs[:]
    rnd.shuffle(arrival)
    assert simulate_lru_hits(dfs, block, capacity) >= simulate_lru_hits(arrival, block, capacity)


@given(shared_prefix_seqs(), st.sampled_from([1, 2]), st.integers(1, 20))
def test_lru_simulation_never_exceeds_the_best_possible(seqs, block, capacity):
    assert simulate_lru_hits(seqs, block, capacity) <= prefix_stats(seqs, block).best_cached_tokens


def _hit_fractions(seqs: list[list[int]], prompts_in_cache: int = 4) -> tuple[float, float]:
    """(grouped, arrival) cached tokens as fractions of the best possible.

    The cache holds a few of the longest prompts: at least the longest, as the DFS theorem needs,
    but far below the shared prefixes' working set, so that order matters. (A cache of 10% of all
    prompt tokens holds every template of workload (b) and arrival order would do as well.)
    """
    block = 16
    capacity = prompts_in_cache * max(len(s) // block for s in seqs)
    assert capacity < 0.1 * sum(len(s) // block for s in seqs)
    best = prefix_stats(seqs, block).best_cached_tokens
    grouped = [seqs[i] for i in order_by_prefix(seqs, _identity)]
    return (simulate_lru_hits(grouped, block, capacity) / best,
            simulate_lru_hits(seqs, block, capacity) / best)


def _random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(50_000) for _ in range(n)]


def test_few_shot_templates_times_questions_shuffled():
    # Workload (b) of issue 5, scaled down: templates x questions in random arrival order.
    rng = random.Random(0)
    templates = [_random_tokens(rng, 1500) for _ in range(16)]
    seqs = [t + _random_tokens(rng, rng.randint(20, 80)) for t in templates for _ in range(32)]
    rng.shuffle(seqs)
    grouped, arrival = _hit_fractions(seqs)
    assert grouped >= 0.95
    assert arrival < 0.5


def test_rag_documents_times_questions_shuffled():
    # Workload (c): each document asked several questions, all shuffled.
    rng = random.Random(1)
    docs = [_random_tokens(rng, 2000) for _ in range(100)]
    seqs = [d + _random_tokens(rng, rng.randint(20, 80)) for d in docs for _ in range(5)]
    rng.shuffle(seqs)
    grouped, arrival = _hit_fractions(seqs)
    assert grouped >= 0.95
    assert arrival < 0.2


def test_nested_system_prompt_templates_and_questions():
    # Shared system prompt, then templates, then questions: two levels of sharing.
    rng = random.Random(2)
    system = _random_tokens(rng, 512)
    templates = [system + _random_tokens(rng, 700) for _ in range(12)]
    seqs = [t + _random_tokens(rng, rng.randint(10, 60)) for t in templates for _ in range(40)]
    rng.shuffle(seqs)
    grouped, arrival = _hit_fractions(seqs)
    assert grouped >= 0.95
    assert arrival < 0.8  # the system prompt alone is hit in any order


@st.composite
def jobs(draw) -> dict[str, list[list[int]]]:
    names = draw(st.lists(st.sampled_from("abcde"), unique=True, max_size=4))
    return {name: draw(shared_prefix_seqs(max_seqs=25)) for name in names}


@given(jobs(), st.integers(1, 30))
@settings(max_examples=200)
def test_multi_job_windows_route_every_row_back_to_its_job(job_rows, window):
    stream = list(interleave_jobs(job_rows))
    windows = list(WindowedPrefixOrderer(window_rows=window).windows(iter(stream)))
    # Each window is a reordering of the next `window` rows of the stream, no more.
    assert all(0 < len(w) <= window for w in windows)
    start = 0
    for w in windows:
        assert sorted(map(id, w)) == sorted(map(id, stream[start:start + len(w)]))
        start += len(w)
    assert start == len(stream)
    # Routed by job id and re-sorted by row index, every job gets exactly its own rows back.
    routed: dict[str, list[PromptRow]] = {}
    for row in chain.from_iterable(windows):
        routed.setdefault(row.job_id, []).append(row)
    for job_id, rows in job_rows.items():
        got = sorted(routed.pop(job_id, []), key=lambda r: r.row_index)
        assert [r.row_index for r in got] == list(range(len(rows)))
        assert [r.token_ids for r in got] == rows
    assert not routed


@given(shared_prefix_seqs(), st.integers(1, 50))
def test_windows_are_prefix_ordered_with_a_custom_key(seqs, window):
    rows = [(f"result-{i}", i, s) for i, s in enumerate(seqs)]
    orderer = WindowedPrefixOrderer(window_rows=window, key=lambda r: r[2])
    out = []
    for k, w in enumerate(orderer.windows(rows)):
        chunk = rows[k * window:(k + 1) * window]
        assert w == [chunk[i] for i in order_by_prefix(chunk, lambda r: r[2])]
        out.extend(w)
    # Results re-sorted by input index restore input order.
    assert sorted(out, key=lambda r: r[1]) == rows


def test_interleave_jobs_mixes_jobs_round_robin():
    rows = list(interleave_jobs({"a": [[1], [2], [3]], "b": [[4]]}))
    assert [(r.job_id, r.row_index) for r in rows] == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]


@pytest.mark.slow
def test_orders_50k_prompts_of_1000_tokens_in_seconds():
    rng = np.random.default_rng(0)
    templates = [rng.integers(0, 50_000, 600).tolist() for _ in range(500)]
    variants = [rng.integers(0, 50_000, 200).tolist() for _ in range(1000)]
    seqs = [templates[k // 2] + variants[k] + rng.integers(0, 50_000, 200).tolist()
            for k in rng.integers(0, 1000, 50_000)]
    # Every prompt a distinct list; the second workload branches at ~every token of one stem.
    stem = rng.integers(0, 50_000, 1000).tolist()
    branchy = [stem[:k] + rng.integers(0, 50_000, 1000 - k).tolist() for k in rng.integers(0, 1000, 50_000)]
    for workload in (seqs, branchy):
        start = time.perf_counter()
        order = order_by_prefix(workload, _identity)
        elapsed = time.perf_counter() - start
        assert sorted(order) == list(range(len(workload)))
        assert elapsed < 10, elapsed  # about 1 s each on a dev box; generous for shared CI runners
