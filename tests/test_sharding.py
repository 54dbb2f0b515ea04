"""Property tests for splitting one job over workers and merging the results in input order."""
from __future__ import annotations

import random
from itertools import chain

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.prefix_order import prefix_stats
from worker.sharding import merge_in_input_order, plan_shards

BLOCK = 2  # small blocks so that hypothesis' short prompts share whole blocks


@st.composite
def grouped_prompts(draw) -> list[list[int]]:
    stems = draw(st.lists(st.lists(st.integers(0, 3), max_size=8), min_size=1, max_size=6))
    n = draw(st.integers(0, 60))
    return [draw(st.sampled_from(stems)) + draw(st.lists(st.integers(0, 3), max_size=6)) for _ in range(n)]


@given(grouped_prompts(), st.integers(1, 25))
def test_every_row_in_exactly_one_shard_within_size_bounds(prompts, max_rows):
    shards = plan_shards(prompts, max_rows, block_size=BLOCK)
    assert sorted(chain.from_iterable(shards)) == list(range(len(prompts)))
    assert all(1 <= len(s) <= max_rows for s in shards)
    assert all(len(s) >= (max_rows + 1) // 2 for s in shards[:-1])


@given(grouped_prompts(), st.integers(2, 25))
def test_small_prefix_groups_are_never_split(prompts, max_rows):
    shards = plan_shards(prompts, max_rows, block_size=BLOCK)
    shard_of = {row: k for k, shard in enumerate(shards) for row in shard}
    for p in prompts:
        for blocks in range(1, len(p) // BLOCK + 1):
            prefix = p[:blocks * BLOCK]
            group = [i for i, q in enumerate(prompts) if q[:len(prefix)] == prefix]
            if len(group) <= max_rows // 2:
                assert len({shard_of[i] for i in group}) == 1


def test_shared_prefixes_are_prefilled_about_once_across_shards():
    # 40 templates x 25 questions shuffled, over shards of 100 rows: cutting the arrival order
    # would put nearly every template in every shard.
    rng = random.Random(0)
    templates = [[rng.randrange(50_000) for _ in range(512)] for _ in range(40)]
    prompts = [t + [rng.randrange(50_000) for _ in range(40)] for t in templates for _ in range(25)]
    rng.shuffle(prompts)

    def prefilled_blocks(shards):  # distinct full blocks each worker must compute, summed
        return sum(prefix_stats([prompts[i] for i in s]).distinct_block_tokens // 16 for s in shards)

    planned = plan_shards(prompts, 100)
    naive = [list(range(k, min(k + 100, len(prompts)))) for k in range(0, len(prompts), 100)]
    lower_bound = prefix_stats(prompts).distinct_block_tokens // 16
    assert len(planned) == len(naive) == 10
    assert prefilled_blocks(planned) == lower_bound  # 25-row groups fit whole in 100-row shards
    assert prefilled_blocks(naive) > 4 * lower_bound


@given(grouped_prompts(), st.integers(1, 25), st.randoms())
def test_shard_results_merge_back_in_input_order(prompts, max_rows, rnd):
    shards = plan_shards(prompts, max_rows, block_size=BLOCK)
    # Workers finish rows, and shards, in any order.
    results = [[(row, ("out", prompts[row])) for row in shard] for shard in shards]
    for r in results:
        rnd.shuffle(r)
    rnd.shuffle(results)
    merged = merge_in_input_order(results, num_rows=len(prompts))
    assert merged == [("out", p) for p in prompts]
    assert merge_in_input_order(iter(results)) == merged


def test_merge_rejects_duplicates_gaps_and_strays():
    with pytest.raises(ValueError, match="more than once"):
        merge_in_input_order([[(0, "a"), (1, "b")], [(1, "b")]])
    with pytest.raises(ValueError, match="missing"):
        merge_in_input_order([[(0, "a"), (2, "c")]])
    with pytest.raises(ValueError, match="missing"):
        merge_in_input_order([[(0, "a"), (1, "b")]], num_rows=3)  # a lost tail
    with pytest.raises(ValueError, match="out of range"):
        merge_in_input_order([[(0, "a"), (1, "b"), (-1, "x")]], num_rows=3)
    assert merge_in_input_order([]) == []


def test_plan_shards_rejects_an_empty_shard_size():
    with pytest.raises(ValueError):
        plan_shards([[1, 2]], 0)
