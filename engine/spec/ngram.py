"""Prompt-lookup n-gram proposer (vLLM's `--speculative-method ngram`, prompt_lookup_min/max).

For n from max_n down to min_n: find the latest *earlier* occurrence of the last n tokens
of the history and propose the tokens that followed it. Each request keeps an incremental
index (per n: n-gram -> latest end position), so a step costs O(new tokens * #n), not
O(history). N-grams are keyed by rolling hashes (`engine/spec/gram_hash.py`), not tuples: a
prompt's keys come at C speed, and the index holds ints the garbage collector never scans (with
tuples, a batch of 256 prompts put some 230k tracked objects in the heap, and collections
landed in steps).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.spec.gram_hash import MASK, POW, P, gram_keys, gram_keys_array, prefix_hashes, tail_key


@dataclass
class _NgramIndex:
    min_n: int
    max_n: int
    tokens: list[int] = field(default_factory=list)
    prefix: list[int] = field(default_factory=list)  # prefix[i]: hash of tokens[0..i]
    # tables[n - min_n]: n-gram key -> end index e of its latest occurrence that has a
    # follower (e + 1 < len(tokens)); the trailing n-gram itself is never indexed, so a lookup
    # of the suffix always finds an *earlier* occurrence.
    tables: list[dict[int, int]] = field(default_factory=list)
    indexed_to: int = 0  # end positions < indexed_to are in the tables
    # The first proposal searches the history with numpy instead of building the tables, which
    # the next sync builds: at a large batch most requests are looked at once (a probe, a plan
    # that found nothing), and a prompt's tables cost several times the search.
    lazy: bool = True

    def __post_init__(self) -> None:
        self.tables = [{} for _ in range(self.max_n - self.min_n + 1)]

    def sync(self, history: list[int]) -> None:
        t = self.tokens
        if len(history) < len(t) or (t and history[len(t) - 1] != t[-1]):
            self.tokens, self.prefix, self.indexed_to = [], [], 0  # history rewritten: rebuild
            self.tables = [{} for _ in self.tables]
            self.lazy = True
            t = self.tokens
        f = self.prefix
        if len(history) == len(t) + 1 and f:  # one new token (most calls): no slicing, no call
            x = history[-1]
            t.append(x)
            f.append((f[-1] * P + x + 2) & MASK)
        elif len(history) > len(t):
            new = history[len(t):]
            t.extend(new)
            f.extend(prefix_hashes(new, f[-1] if f else 0))
        if self.lazy:
            return
        last = len(t) - 1  # newest token has no follower yet
        if 0 < last - self.indexed_to <= 2 and self.indexed_to >= self.max_n:
            # A step's worth of new tokens: keys inline (most calls; e >= max_n >= n here).
            for e in range(self.indexed_to, last):
                fe = f[e]
                for n, table in enumerate(self.tables, self.min_n):
                    table[(fe - f[e - n] * POW[n]) & MASK] = e
            self.indexed_to = last
            return
        for n in range(self.min_n, self.max_n + 1):
            e0 = max(self.indexed_to, n - 1)
            if e0 < last:
                # update keeps the latest end of each key, at C speed
                self.tables[n - self.min_n].update(zip(gram_keys(f, n, e0, last), range(e0, last)))
        self.indexed_to = max(self.indexed_to, last)

    def propose(self, k: int) -> list[int]:
        if self.lazy:
            self.lazy = False
            return self._search(k)
        t, f, L = self.tokens, self.prefix, len(self.tokens)
        for n in range(min(self.max_n, L), self.min_n - 1, -1):
            key = (f[L - 1] - (f[L - 1 - n] if L > n else 0) * POW[n]) & MASK  # the last n tokens
            e = self.tables[n - self.min_n].get(key)
            if e is not None:
                return _copy_from(t, e + 1, k)
        return []

    def _search(self, k: int) -> list[int]:
        """`propose` without the tables: the keys of every n-gram with a follower at C speed,
        the latest one equal to the tail's (the tables' answer, collisions included)."""
        t, L = self.tokens, len(self.tokens)
        if L < 2:
            return []
        f = np.asarray(self.prefix, dtype=np.int64)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            keys = gram_keys_array(f, n, n - 1, L - 1)  # the n-grams ending at n-1 .. L-2
            hits = np.flatnonzero(keys == tail_key(self.prefix, n))
            if hits.size:
                return _copy_from(t, int(hits[-1]) + n, k)
        return []


def _copy_from(t: list[int], start: int, k: int) -> list[int]:
    # Copy t[start:], continuing into the draft itself when the match overlaps the end
    # (periodic text such as "a b a b" keeps proposing the period).
    out: list[int] = []
    L = len(t)
    for i in range(k):
        j = start + i
        out.append(t[j] if j < L else out[j - L])
    return out


class NgramProposer:
    is_deterministic = True

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n <= len(POW) - 1:
            raise ValueError(f"need 1 <= min_n <= max_n <= {len(POW) - 1}, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._index: dict[str, _NgramIndex] = {}

    def propose(
        self,
        request_ids: list[str],
        token_ids: list[list[int]],
        k: list[int],
        job_ids: list[str | None] | None = None,
    ) -> list[list[int]]:
        out: list[list[int]] = []
        for rid, hist, ki in zip(request_ids, token_ids, k):
            idx = self._index.get(rid)
            if idx is None:
                idx = self._index[rid] = _NgramIndex(self.min_n, self.max_n)
            idx.sync(hist)  # keep indexing even when k == 0 so later steps stay O(new)
            out.append(idx.propose(ki) if ki > 0 else [])
        return out

    def on_finished(self, request_id: str, token_ids: list[int], job_id: str | None = None) -> None:
        self._index.pop(request_id, None)


def ngram_propose_reference(history: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """From-scratch O(len * n) definition, used by tests to check the incremental index."""
    L = len(history)
    for n in range(min(max_n, L), min_n - 1, -1):
        suffix = history[L - n:]
        for e in range(L - 2, n - 2, -1):  # end positions with a follower, latest first
            if history[e - n + 1:e + 1] == suffix:
                return _copy_from(history, e + 1, k)
    return []
