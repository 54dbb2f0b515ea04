"""Split one big job into shards for several workers, and merge their results back in input order.

Each worker caches prefixes on its own GPU, so a prefix group split over two shards is prefilled
twice. Shards are therefore cut from the prefix (DFS) order, at the points where neighbouring rows
share the fewest full KV blocks; the worker then prefix-orders within its shard as usual.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from worker.prefix_order import PrefixTree

R = TypeVar("R")


def plan_shards(
    prompts_token_ids: Sequence[Sequence[int]], max_rows_per_shard: int, block_size: int = 16
) -> list[list[int]]:
    """Row indices of each shard, in prefix order; every row is in exactly one shard.

    Every shard has at most `max_rows_per_shard` rows and every shard but the last at least half
    that, so the shard count stays within about twice the minimum. Within those bounds each cut
    goes where the rows on either side share the fewest full blocks (the latest such point), so
    rows sharing their first d full blocks all land in one shard whenever there are at most
    `max_rows_per_shard // 2` of them.
    """
    if max_rows_per_shard < 1:
        raise ValueError("max_rows_per_shard must be at least 1")
    order, lcp = PrefixTree.build(prompts_token_ids).walk()
    # Cutting just before position k makes the next shard prefill these shared blocks again.
    cut_cost = [shared // block_size for shared in lcp]
    min_rows = (max_rows_per_shard + 1) // 2
    shards: list[list[int]] = []
    start = 0
    while len(order) - start > max_rows_per_shard:
        candidates = range(start + min_rows, start + max_rows_per_shard + 1)
        cut = min(candidates, key=lambda k: (cut_cost[k], -k))
        shards.append(order[start:cut])
        start = cut
    if start < len(order):
        shards.append(order[start:])
    return shards


def merge_in_input_order(
    shard_results: Iterable[Iterable[tuple[int, R]]], num_rows: int | None = None
) -> list[R]:
    """Results of all shards as one list in input order, given (row_index, result) pairs.

    Raises ValueError unless every row 0..n-1 comes back exactly once. Pass `num_rows` so that
    missing trailing rows are caught too; without it n is the number of results returned.
    """
    by_row: dict[int, R] = {}
    for shard in shard_results:
        for row, result in shard:
            if row in by_row:
                raise ValueError(f"row {row} returned more than once")
            by_row[row] = result
    n = len(by_row) if num_rows is None else num_rows
    if len(by_row) != n or not all(0 <= row < n for row in by_row):
        missing = sorted(set(range(n)) - by_row.keys())
        extra = sorted(row for row in by_row if not 0 <= row < n)
        raise ValueError(f"expected rows 0..{n - 1}: missing {missing[:10]}, out of range {extra[:10]}")
    return [by_row[row] for row in range(n)]
