"""The suffix proposer's index (`SuffixIndex`): an append-only token store with, per n-gram
length in a ladder up to `max_depth`, a map from n-gram to its recent end positions, and the
longest-suffix match with the most frequent continuation over those positions.

That is the suffix tree's node for the matched suffix (its occurrence list) without
materialising O(len * depth) trie nodes, so appending a token costs O(#lengths) and memory stays
O(len * #lengths). N-grams are keyed by a rolling hash, not by tuples of tokens: a key is one
multiply-subtract of two prefix hashes, and a long append (a prompt, a finished output)
computes its keys with numpy.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from engine.spec.gram_hash import MASK as _MASK
from engine.spec.gram_hash import NUMPY_FROM, gram_key, gram_keys, gram_keys_array, prefix_hashes, tail_key
from engine.spec.gram_hash import POW as _POW

__all__ = ["SEP", "Draft", "SuffixIndex", "gram_key", "match_generations"]

SEP = -1  # separates sequences in a job index; never matched, ends continuations

# Each appended token costs one insert per length. Doubling lengths (1, 2, 4, 8, 16, 32) build
# about 30% faster (CPU), but a match of 5-7 tokens then counts as 4, and a draft is capped by
# its match length: on the H200 (5d49319) JSON with suffix fell to 1.09x at batch 1 and 0.96x at
# batch 8, from 1.18-1.24x and 1.16x with these lengths, and nothing measured gained.
DEFAULT_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)  # empirical P(token | draft so far)
    match_len: int = 0

    @property
    def score(self) -> float:
        # expected number of accepted tokens if the estimates were right
        s, c = 0.0, 1.0
        for p in self.probs:
            c *= p
            s += c
        return s


class SuffixIndex:
    """Append-only token store with an n-gram -> occurrence-end-positions index, per length
    in the ladder; n-grams are keyed by `gram_key`."""

    def __init__(self, max_depth: int = 32, max_occurrences: int = 32) -> None:
        self.lengths = tuple(n for n in DEFAULT_LENGTHS if n <= max_depth) or (1,)
        self.max_occ = max_occurrences
        self.tokens: list[int] = []
        self.prefix: list[int] = []  # prefix[i]: hash of tokens[0..i]
        self.tables: dict[int, dict[int, int | tuple[int, ...]]] = {n: {} for n in self.lengths}
        self.indexed_to = 0  # end positions < indexed_to are indexed
        self.has_sep = False  # request indexes never hold SEP: skip the per-gram check
        # Tokens held but not indexed yet (`hold`): lookups scan them with numpy until the next
        # append indexes everything. A request's first look is often its only one at a large
        # batch (a probe), and indexing a prompt costs about ten scans.
        self.lazy = False
        self._lazy_f: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def _extend(self, new: list[int]) -> None:
        self.tokens.extend(new)
        self.prefix.extend(prefix_hashes(new, self.prefix[-1] if self.prefix else 0))

    def hold(self, tokens: list[int]) -> None:
        """Take the tokens of a new request's history without indexing them (an empty index
        only): until the next `append`, lookups answer as if `append(tokens)` had indexed them."""
        if self.tokens:
            raise ValueError("hold is for an empty index")
        self._extend(tokens)
        self.lazy, self._lazy_f = True, None

    def append(self, new_tokens: list[int], index_last: bool = False) -> None:
        """Add tokens. The final token is indexed only when `index_last` (it has no follower
        yet in a live request; indexing it would make the context match itself)."""
        self.lazy, self._lazy_f = False, None  # (indexed_to is still 0: everything is indexed now)
        self._extend(new_tokens)
        self.has_sep = self.has_sep or SEP in new_tokens
        t, check_sep = self.tokens, self.has_sep
        stop = len(t) - (0 if index_last else 1)
        if not check_sep and stop - self.indexed_to >= NUMPY_FROM:
            for n in self.lengths:  # one length at a time, keys at C speed
                lo = max(self.indexed_to, n - 1)
                if lo < stop:
                    self._insert_run(n, lo, stop)
            self.indexed_to = max(self.indexed_to, stop)
            return
        # A step's few tokens: the insert inlined (a call per n-gram would cost a third more)
        f, tables, cap, keep = self.prefix, self.tables, 2 * self.max_occ, 1 - self.max_occ
        for e in range(self.indexed_to, stop):
            if check_sep and t[e] == SEP:
                continue
            fe = f[e]
            for n in self.lengths:
                if n > e + 1 or (check_sep and SEP in t[e - n + 1:e + 1]):
                    break  # longer n-grams reach back further
                g = (fe - (f[e - n] if e >= n else 0) * _POW[n]) & _MASK
                table = tables[n]
                occ = table.get(g)
                if occ is None:
                    table[g] = e
                elif type(occ) is int:
                    table[g] = (occ, e)
                elif len(occ) < cap:
                    table[g] = occ + (e,)
                else:  # keep the most recent
                    table[g] = occ[len(occ) + keep:] + (e,)
        self.indexed_to = max(self.indexed_to, stop)

    def _insert_run(self, n: int, lo: int, stop: int) -> None:
        """Index the n-grams ending at lo..stop-1 (keys at C speed for a long run). (Putting
        runs with no repeated n-gram in at C speed, `dict.update`, was slower: job outputs
        share n-grams with earlier ones, so the check mostly failed.)"""
        self._insert_all(self.tables[n], gram_keys(self.prefix, n, lo, stop), range(lo, stop))

    def _insert_all(self, table: dict, keys, ends) -> None:
        """Record each n-gram's end position (one length's table). `append`'s loop for a step's
        few tokens repeats this insert on purpose: a call per n-gram there cost a third more.
        Most n-grams occur once: a bare int. More occurrences go in a tuple, which the garbage collector stops tracking
        once it has seen it holds only ints: as lists, a job index's 400k of them made every
        full collection take 300 ms (dev CPU), a stall of whichever step it fell in."""
        get, cap, keep = table.get, 2 * self.max_occ, 1 - self.max_occ
        for g, e in zip(keys, ends):
            occ = get(g)
            if occ is None:
                table[g] = e
            elif type(occ) is int:
                table[g] = (occ, e)
            elif len(occ) < cap:
                table[g] = occ + (e,)
            else:  # keep the most recent
                table[g] = occ[len(occ) + keep:] + (e,)

    def append_sequence(self, seq: list[int]) -> None:
        """Add a finished sequence and a SEP after it, every position of it indexed (its last
        token's follower is the SEP). N-grams never reach back across the SEP before it, so
        each length is indexed over the sequence alone; same tables as `append`."""
        if SEP in seq:
            raise ValueError("a sequence may not contain the separator")
        start = len(self.tokens)  # position of seq[0]
        self._extend(seq)
        self.has_sep = True
        for n in self.lengths:
            if n > len(seq):
                break
            self._insert_run(n, start + n - 1, start + len(seq))
        self._extend([SEP])
        self.indexed_to = len(self.tokens)

    def tail_key(self, n: int) -> int:
        """The key of this index's last n tokens (n <= len), from two prefix hashes."""
        return tail_key(self.prefix, n)

    def longest(self, context: list[int], tail: "SuffixIndex | None" = None
                ) -> tuple[int, int | tuple[int, ...] | None]:
        """The longest indexed suffix of `context`: its length and occurrence ends (an int for
        one), by binary search over the ladder: a context suffix found at length n is found at
        every shorter length too (the same end position indexes all of them, and keys are never
        removed), so matches are monotone in n. `tail`: an index whose tokens end with
        `context` (the request's own): its prefix hashes give each suffix key in O(1)."""
        lengths, tables, C = self.lengths, self.tables, len(context)
        hi = bisect.bisect_right(lengths, C)  # candidates lengths[lo:hi]
        if hi == 0:
            return 0, None
        # Otherwise the context's suffix keys, from its end backwards, computed only as far as
        # the search reaches (a miss at 8 never pays for the keys of 9-32).
        hs = [0]
        occ: int | tuple[int, ...] | None = None
        n_match, lo = 0, 0
        while lo < hi:
            mid = (lo + hi) // 2
            n = lengths[mid]
            if tail is not None:
                key = tail.tail_key(n)
            else:
                for m in range(len(hs), n + 1):
                    hs.append((hs[-1] + (context[C - m] + 2) * _POW[m - 1]) & _MASK)
                key = hs[n]
            found = tables[n].get(key) if not self.lazy else self._scan(n, key)
            if found is None:
                hi = mid
            else:
                occ, n_match, lo = found, n, mid + 1
        return n_match, occ

    def _scan(self, n: int, key: int) -> int | tuple[int, ...] | None:
        """A held index's lookup: the latest `max_occ` end positions < len - 1 of n-grams with
        this key (what `match` reads of a table's entry), by a numpy scan."""
        L = len(self.tokens)
        if L - 1 <= n - 1:
            return None
        if self._lazy_f is None:
            self._lazy_f = np.asarray(self.prefix, dtype=np.int64)
        hits = np.flatnonzero(gram_keys_array(self._lazy_f, n, n - 1, L - 1) == key)
        if not hits.size:
            return None
        ends = (hits[-self.max_occ:] + (n - 1)).tolist()
        return ends[0] if len(ends) == 1 else tuple(ends)

    def match(
        self,
        context: list[int],
        k: int,
        min_prob: float,
        spec_factor: float,
        self_overlap: bool = False,
        tail: "SuffixIndex | None" = None,
    ) -> Draft:
        """`tail`: as in `longest`."""
        if k <= 0:
            return Draft()
        n_match, occ = self.longest(context, tail)
        if occ is None:
            return Draft()
        if type(occ) is int:
            occ = (occ,)
        # A short match is weak evidence whatever its counts say: cap the draft by it.
        k = min(k, max(1, int(spec_factor * n_match)))
        t, L = self.tokens, len(self.tokens)
        if len(occ) == 1 and occ[0] + k < L:
            # One occurrence, followed in the store by k tokens (copying from a prompt, the
            # common case): every probability is 1, so the draft is those tokens up to a SEP.
            e = occ[0]
            draft = t[e + 1:e + 1 + k]
            if self.has_sep and SEP in draft:
                draft = draft[:draft.index(SEP)]
            return Draft(draft, [1.0] * len(draft), n_match)
        alive = occ[-self.max_occ:]
        draft: list[int] = []
        probs: list[float] = []
        cum = 1.0
        for i in range(k):
            # Each live occurrence's next token (this loop is the proposer's per-step cost):
            # from the store, or from the draft itself when a match overlaps the end (periodic
            # text); SEP and running out end an occurrence. Occurrences are in ascending order,
            # so those whose next token is in the store come first: one comprehension for them.
            off = 1 + i
            cut = len(alive) if alive[-1] + off < L else bisect.bisect_left(alive, L - off)
            ends = alive[:cut]
            toks = [t[e + off] for e in ends]
            if self.has_sep and SEP in toks:
                ends = [e for e, x in zip(ends, toks) if x != SEP]
                toks = [x for x in toks if x != SEP]
            if self_overlap and cut < len(alive):
                ends = list(ends)  # (a slice of the stored tuple)
                for e in alive[cut:]:
                    j = e + off - L
                    if j < len(draft):
                        ends.append(e)
                        toks.append(draft[j])
            if not toks:
                break
            if len(toks) == 1:
                tok, c = toks[0], 1
            else:
                # The most frequent next token; ties go to the one seen first.
                tok = max(dict.fromkeys(toks), key=toks.count)
                c = toks.count(tok)
            p = c / len(alive)  # occurrences that ended count as "stop" mass
            cum *= p
            if cum < min_prob:
                break
            draft.append(tok)
            probs.append(p)
            alive = ends if c == len(ends) else [e for e, x in zip(ends, toks) if x == tok]
        return Draft(draft, probs, n_match)


def match_generations(indexes: tuple[SuffixIndex, ...], context: list[int], k: int, min_prob: float,
                      spec_factor: float, tail: SuffixIndex | None = None) -> Draft:
    """`SuffixIndex.match` over several indexes of finished sequences (newest first) as if they
    were one: the longest suffix found in any, the newest `max_occ` of its occurrences across
    them, the most frequent continuation over those (ties to the oldest). Each store ends with
    a SEP, so an occurrence's continuation never runs past its own store."""
    if len(indexes) == 1:
        return indexes[0].match(context, k, min_prob, spec_factor, tail=tail)
    if k <= 0:
        return Draft()
    found = [(idx, *idx.longest(context, tail)) for idx in reversed(indexes)]  # oldest first
    n_match = max(n for _, n, _ in found)
    if n_match == 0:
        return Draft()
    alive: list[tuple[list[int], int]] = []
    for idx, n, occ in found:
        if n == n_match:
            alive.extend((idx.tokens, e) for e in ((occ,) if type(occ) is int else occ)[-idx.max_occ:])
    alive = alive[-indexes[0].max_occ:]
    k = min(k, max(1, int(spec_factor * n_match)))
    draft: list[int] = []
    probs: list[float] = []
    cum = 1.0
    for i in range(1, k + 1):
        live, toks = [], []
        for t, e in alive:
            if e + i < len(t) and (x := t[e + i]) != SEP:
                live.append((t, e))
                toks.append(x)
        if not toks:
            break
        tok = max(dict.fromkeys(toks), key=toks.count)
        c = toks.count(tok)
        p = c / len(alive)
        cum *= p
        if cum < min_prob:
            break
        draft.append(tok)
        probs.append(p)
        alive = [a for a, x in zip(live, toks) if x == tok]
    return Draft(draft, probs, n_match)
