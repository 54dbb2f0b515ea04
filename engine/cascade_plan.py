"""Which decode rows share prefix blocks, for shared-prefix (cascade) attention.

Prefix caching makes requests with a common prompt prefix point at the same physical
KV blocks, so sharing shows up directly in the block tables: rows whose tables start
with the same block ids share those tokens. A group of n rows sharing L blocks lets
the cascade kernel read those L blocks once instead of n times.

Groups nest (a system prompt shared by everyone, a document shared by a few
questions), so the plan tries a few levels of the block-id trie and keeps the level
that saves the most reads. The layout is fixed
(`max_groups` real groups, then a last group with no prefix that holds every other
row), so a CUDA graph captured once serves every plan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_GROUPS = 64  # groups per step; CUDA graphs are captured for this many


@dataclass
class CascadePlan:
    prefix_tables: np.ndarray  # [max_groups + 1, width] int32; the last group has no prefix
    prefix_lens: np.ndarray    # [max_groups + 1] int32, whole blocks' worth of tokens
    group_cu: np.ndarray       # [max_groups + 2] int32: group g is order[group_cu[g]:group_cu[g+1]]
    order: np.ndarray          # [B] int32: rows sorted by group
    suffix_tables: np.ndarray  # [B, width] int32: each row's blocks after its group's prefix
    suffix_lens: np.ndarray    # [B] int32
    saved_tokens: int          # KV tokens per layer no longer read twice
    num_groups: int            # real groups used


@dataclass
class RowGroups:
    """Which rows share how many leading blocks: group g is rows[offsets[g]:offsets[g] + sizes[g]],
    whose first common[g] blocks are the same, listed best group (most reads saved) first."""
    rows: np.ndarray
    sizes: np.ndarray
    common: np.ndarray


def find_groups(table: np.ndarray, ctx: np.ndarray, block_size: int,
                max_groups: int = MAX_GROUPS) -> RowGroups | None:
    """The max_groups groups that save the most reads, at the best level of the block-id trie."""
    B = len(ctx)
    if B < 2:
        return None
    # A row's prefix stops before the block holding its last token: that block may be
    # its own, and the suffix must not be empty.
    cap = (np.asarray(ctx, dtype=np.int64) - 1) // block_size
    if len(np.unique(table[:, 0])) == B:  # the common case without sharing costs one unique
        return None
    found = _best_level(table, cap)
    if found is None:
        return None
    rows, sizes, common = found
    gain = (sizes - 1) * common
    rank = np.argsort(-gain, kind="stable")[:max_groups]
    group_of_row = np.repeat(np.arange(len(sizes)), sizes)
    pos = np.full(len(sizes), -1)
    pos[rank] = np.arange(len(rank))
    row_rank = pos[group_of_row]
    keep = row_rank >= 0
    rows = rows[keep][np.argsort(row_rank[keep], kind="stable")]
    return RowGroups(rows, sizes[rank], common[rank])


def layout(groups: RowGroups, table: np.ndarray, ctx: np.ndarray, block_size: int,
           max_groups: int = MAX_GROUPS, min_saved_fraction: float = 0.3) -> CascadePlan | None:
    """The kernel's fixed layout for these groups, or None when they save too little."""
    rows, sizes, common = groups.rows, groups.sizes, groups.common
    saved = int(((sizes - 1) * common).sum())
    if saved * block_size < min_saved_fraction * float(np.sum(ctx)):
        return None
    B, W = table.shape
    G = max_groups + 1
    ng = len(sizes)
    first = rows[np.cumsum(sizes) - sizes]
    prefix_tables = np.zeros((G, W), dtype=np.int32)
    prefix_tables[:ng] = table[first]  # the kernel reads only the first prefix_lens // block_size
    prefix_lens = np.zeros(G, dtype=np.int32)
    prefix_lens[:ng] = common * block_size
    group_cu = np.full(G + 1, len(rows), dtype=np.int32)
    group_cu[0] = 0
    group_cu[1:ng + 1] = np.cumsum(sizes)
    group_cu[G] = B
    row_blocks = np.zeros(B, dtype=np.int64)
    row_blocks[rows] = np.repeat(common, sizes)
    grouped = np.zeros(B, dtype=bool)
    grouped[rows] = True
    order = np.concatenate([rows, np.flatnonzero(~grouped)]).astype(np.int32)
    # Shift each row's table left by its prefix's blocks.
    idx = np.minimum(row_blocks[:, None] + np.arange(W)[None, :], W - 1)
    suffix_tables = table[np.arange(B)[:, None], idx].astype(np.int32, copy=False)
    suffix_lens = (np.asarray(ctx, dtype=np.int64) - row_blocks * block_size).astype(np.int32)
    return CascadePlan(prefix_tables, prefix_lens, group_cu, order, suffix_tables, suffix_lens,
                       saved * block_size, ng)


def plan_cascade(table: np.ndarray, ctx: np.ndarray, block_size: int, max_groups: int = MAX_GROUPS,
                 min_saved_fraction: float = 0.3) -> CascadePlan | None:
    """Groups for rows with block tables `table` [B, W] and context lengths `ctx` [B], or
    None when sharing would save less than `min_saved_fraction` of the KV reads."""
    groups = find_groups(table, ctx, block_size, max_groups)
    if groups is None:
        return None
    return layout(groups, table, ctx, block_size, max_groups, min_saved_fraction)


class CascadePlanner:
    """plan_cascade, reusing the grouping while a decode batch keeps the same requests in the
    same order (most steps of a large batch). A running request's blocks only ever grow at
    the end, with blocks of its own, so its groups stay valid; the check that the shared
    columns are unchanged also catches a request that lost its blocks and got others."""

    def __init__(self, block_size: int, max_groups: int = MAX_GROUPS, min_saved_fraction: float = 0.3) -> None:
        self.block_size, self.max_groups, self.min_saved_fraction = block_size, max_groups, min_saved_fraction
        self._key: list = []
        self._groups: RowGroups | None = None
        self._shared: np.ndarray | None = None  # grouped rows' first columns when the groups were found
        self._mask: np.ndarray | None = None  # which of those columns each row shares
        self.reused = 0  # plans made from remembered groups (tests, diagnostics)

    def plan(self, key: list, table: np.ndarray, ctx: np.ndarray) -> CascadePlan | None:
        g = self._groups
        if not (g is not None and key == self._key and self._valid(table, ctx)):
            g = self._groups = find_groups(table, ctx, self.block_size, self.max_groups)
            self._key = list(key)
            if g is not None:  # each grouped row's shared columns, to check they still hold
                wc = int(g.common.max())
                self._shared = table[g.rows, :wc].copy()
                self._mask = np.arange(wc)[None, :] < np.repeat(g.common, g.sizes)[:, None]
            if g is None:
                return None
        else:
            self.reused += 1
        return layout(g, table, ctx, self.block_size, self.max_groups, self.min_saved_fraction)

    def _valid(self, table: np.ndarray, ctx: np.ndarray) -> bool:
        g, shared = self._groups, self._shared
        if table.shape[1] < shared.shape[1]:
            return False
        if not ((table[g.rows, :shared.shape[1]] == shared) | ~self._mask).all():
            return False
        cap = (np.asarray(ctx, dtype=np.int64) - 1) // self.block_size
        return bool((cap[g.rows] >= np.repeat(g.common, g.sizes)).all())


def _best_level(table: np.ndarray, cap: np.ndarray, max_levels: int = 4):
    """(rows, group sizes, common blocks) at the level of the block-id trie that saves the most
    reads, or None. Level 1 groups rows by their first block; each next level starts one block
    past the shallowest common prefix found, so a system prompt shared by all and documents
    shared by a few are both tried."""
    best, best_saved = None, 0
    depth = 1
    for _ in range(max_levels):
        found = _groups_at(table, cap, depth)
        if found is None:
            break
        rows, sizes, common = found
        saved = int(((sizes - 1) * common).sum())
        if saved > best_saved:
            best, best_saved = found, saved
        depth = int(common.min()) + 1
    return best


def _groups_at(table: np.ndarray, cap: np.ndarray, depth: int):
    """Rows grouped by their block at column depth-1 (a physical block id stands for the
    prefix ending in it), each group over all the blocks its rows really have in common:
    (rows, sizes, common blocks), rows listed group after group; None if no group forms."""
    rows = np.flatnonzero(cap >= depth)
    if len(rows) < 2:
        return None
    rows = rows[np.argsort(table[rows, depth - 1], kind="stable")]
    key = table[rows, depth - 1]
    change = np.empty(len(key), dtype=bool)
    change[0] = True
    np.not_equal(key[1:], key[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    sizes = np.diff(starts, append=len(rows))
    keep = sizes >= 2
    if not keep.any():
        return None
    starts, sizes = starts[keep], sizes[keep]
    offsets = np.cumsum(sizes) - sizes
    sel = np.arange(int(sizes.sum())) - np.repeat(offsets, sizes) + np.repeat(starts, sizes)
    r = rows[sel]
    ref = np.repeat(rows[starts], sizes)
    # Blocks each row shares with its group's first row, up to the row's own cap.
    W = table.shape[1]
    eq = table[r] == table[ref]
    eq &= np.arange(W)[None, :] < cap[r][:, None]
    match = np.where(eq.all(axis=1), W, np.argmin(eq, axis=1))
    common = np.minimum.reduceat(match, offsets)
    ok = common >= depth  # always, unless two different prefixes ended in the same block id
    if not ok.all():
        keep_rows = np.repeat(ok, sizes)
        r, sizes, common = r[keep_rows], sizes[ok], common[ok]
        if not len(sizes):
            return None
    return r, sizes, common
