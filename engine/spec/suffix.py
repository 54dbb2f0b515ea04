"""SuffixDecoding-style proposer (arXiv 2411.04975, `--speculative-method suffix`).

Two structures answer "which tokens followed the recent context before, how often?":
- per request: its own prompt + output (copying from the document being summarised/rewritten);
- per job: outputs already finished by other requests of the same job (batch jobs repeat
  JSON fields, templates, extraction formats).

Both are a `SuffixIndex`: for each match length n in a fixed ladder up to `max_depth`, a map
n-gram -> recent end positions. That is the suffix tree's node for the matched suffix (its
occurrence list) without materialising O(len * depth) trie nodes, so appending a token costs
O(#lengths) and memory stays O(len * #lengths). From the longest matched suffix we follow the
most frequent continuation over the matching occurrences (the tree's heaviest child), and stop
when the estimated probability that the whole draft is right falls below `min_prob`.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from dataclasses import dataclass, field

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
    """Append-only token store with an n-gram -> occurrence-end-positions index.

    Positions are absolute; `base` moves forward on eviction (`reset_to`)."""

    def __init__(self, max_depth: int = 32, max_occurrences: int = 32) -> None:
        self.lengths = tuple(n for n in DEFAULT_LENGTHS if n <= max_depth) or (1,)
        self.max_occ = max_occurrences
        self.tokens: list[int] = []
        self.base = 0
        self.tables: dict[int, dict[tuple[int, ...], int | tuple[int, ...]]] = {n: {} for n in self.lengths}
        self.indexed_to = 0  # absolute end positions < indexed_to are indexed
        self.has_sep = False  # request indexes never hold SEP: skip the per-gram check

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, new_tokens: list[int], index_last: bool = False) -> None:
        """Add tokens. The final token is indexed only when `index_last` (it has no follower
        yet in a live request; indexing it would make the context match itself)."""
        self.tokens.extend(new_tokens)
        self.has_sep = self.has_sep or SEP in new_tokens
        t, b, check_sep = self.tokens, self.base, self.has_sep
        stop = b + len(t) - (0 if index_last else 1)
        if not check_sep and stop - self.indexed_to >= 32:
            self._append_bulk(stop)
            return
        for e in range(self.indexed_to, stop):
            i = e - b
            if t[i] == SEP:
                continue
            for n in self.lengths:
                if n > i + 1:
                    break
                gram = tuple(t[i - n + 1:i + 1])
                if check_sep and SEP in gram:
                    break  # longer n-grams contain it too
                table = self.tables[n]
                occ = table.get(gram)
                # Most n-grams occur once: a bare int. More occurrences go in a tuple, which
                # the garbage collector stops tracking once it has seen it holds only ints: as
                # lists, a job index's 400k of them made every full collection take 300 ms
                # (dev CPU), a stall of whichever step it fell in.
                if occ is None:
                    table[gram] = e
                elif type(occ) is int:
                    table[gram] = (occ, e)
                elif len(occ) < 2 * self.max_occ:
                    table[gram] = occ + (e,)
                else:  # keep the most recent
                    table[gram] = occ[len(occ) - self.max_occ + 1:] + (e,)
        self.indexed_to = max(self.indexed_to, stop)

    def _append_bulk(self, stop: int) -> None:
        """Index end positions [indexed_to, stop) of a SEP-free store, one length at a time:
        the n-grams come from zip over shifted slices (C speed), so a 1,000-token prompt
        costs one dict update per (n-gram, length) and no slicing. Same tables as the
        token-by-token loop."""
        t, b = self.tokens, self.base
        for n in self.lengths:
            i0, i1 = max(self.indexed_to - b, n - 1), stop - b
            if i0 >= i1:
                continue
            grams = zip(*(t[i0 - n + 1 + j:i1 - n + 1 + j] for j in range(n)))
            self._insert_all(self.tables[n], grams, range(i0 + b, i1 + b))
        self.indexed_to = max(self.indexed_to, stop)

    def _insert_all(self, table: dict, grams, ends) -> None:
        """Record each n-gram's end position (one length's table). The insert repeats
        `append`'s on purpose: a helper call per n-gram would cost this loop a third of its
        speed; one call per length is noise. (The reverse, `append`'s token loop gathering
        n-grams for this helper, doubled a one-token append: 2.1 -> 4.1 us on the CI CPU.)"""
        get, cap, keep = table.get, 2 * self.max_occ, 1 - self.max_occ
        for g, e in zip(grams, ends):
            occ = get(g)
            if occ is None:
                table[g] = e
            elif type(occ) is int:
                table[g] = (occ, e)
            elif len(occ) < cap:
                table[g] = occ + (e,)
            else:
                table[g] = occ[len(occ) + keep:] + (e,)

    def append_sequence(self, seq: list[int]) -> None:
        """Add a finished sequence and a SEP after it, every position of it indexed (its last
        token's follower is the SEP). N-grams never reach back across the SEP before it, so
        each length is indexed in bulk over the sequence alone; same tables as `append`."""
        if SEP in seq:
            raise ValueError("a sequence may not contain the separator")
        t, b = self.tokens, self.base
        start = b + len(t)  # absolute position of seq[0]
        t.extend(seq)
        self.has_sep = True
        for n in self.lengths:
            if n > len(seq):
                break
            grams = zip(*(seq[j:len(seq) - n + 1 + j] for j in range(n)))
            self._insert_all(self.tables[n], grams, range(start + n - 1, start + len(seq)))
        t.append(SEP)
        self.indexed_to = b + len(t)

    def longest(self, context: list[int]) -> tuple[int, int | tuple[int, ...] | None]:
        """The longest indexed suffix of `context`: its length and occurrence ends (an int for
        one), by binary search over the ladder: a context suffix found at length n is found at
        every shorter length too (the same end position indexes all of them, and keys are never
        removed), so matches are monotone in n."""
        occ: int | tuple[int, ...] | None = None
        n_match = 0
        lengths, tables, C = self.lengths, self.tables, len(context)
        lo, hi = 0, bisect.bisect_right(lengths, C)  # candidates lengths[lo:hi]
        while lo < hi:
            mid = (lo + hi) // 2
            n = lengths[mid]
            found = tables[n].get(tuple(context[C - n:]))
            if found is None:
                hi = mid
            else:
                occ, n_match, lo = found, n, mid + 1
        return n_match, occ

    def match(
        self,
        context: list[int],
        k: int,
        min_prob: float,
        spec_factor: float,
        self_overlap: bool = False,
    ) -> Draft:
        if k <= 0:
            return Draft()
        n_match, occ = self.longest(context)
        if occ is None:
            return Draft()
        if type(occ) is int:
            occ = (occ,)
        # A short match is weak evidence whatever its counts say: cap the draft by it.
        k = min(k, max(1, int(spec_factor * n_match)))
        alive = occ[-self.max_occ:]
        t, base, L = self.tokens, self.base, len(self.tokens)
        draft: list[int] = []
        probs: list[float] = []
        cum = 1.0
        for i in range(k):
            # Each live occurrence's next token (this loop is the proposer's per-step cost):
            # from the store, or from the draft itself when a match overlaps the end (periodic
            # text); SEP and running out end an occurrence. Occurrences are in ascending order,
            # so those whose next token is in the store come first: one comprehension for them.
            off = 1 + i - base
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
                      spec_factor: float) -> Draft:
    """`SuffixIndex.match` over several indexes of finished sequences (newest first) as if they
    were one: the longest suffix found in any, the newest `max_occ` of its occurrences across
    them, the most frequent continuation over those (ties to the oldest). Each store ends with
    a SEP, so an occurrence's continuation never runs past its own store."""
    if len(indexes) == 1:
        return indexes[0].match(context, k, min_prob, spec_factor)
    if k <= 0:
        return Draft()
    found = [(idx, *idx.longest(context)) for idx in reversed(indexes)]  # oldest first
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


class _JobIndex:
    """Outputs of one job, at most `max_tokens` of them, in two generations: outputs go into
    the newer index; once it holds half the cap it becomes the older one and the one before
    is dropped whole, so eviction costs nothing. (Before, eviction rebuilt one index from the
    outputs kept: it re-indexed three quarters of the cap every quarter of it, four times the
    indexing per output once a long job filled the cap, and the index restarted empty each
    time.) A proposal matches the generations as one index (`match_generations`).

    Finished outputs are queued and indexed only when a proposal reads the index, a few per
    read: at batch sizes where nobody drafts (a large batch finishing hundreds of requests per
    second), indexing them would cost host time on every step for nothing. The queue keeps
    no more than the cap's worth of the newest outputs."""

    # Outputs indexed per read at most: a large batch's tail (hundreds of outputs finished
    # since the last read) is indexed over several steps instead of stalling one.
    max_per_read = 16

    def __init__(self, max_tokens: int, max_depth: int, max_occ: int) -> None:
        self.max_tokens, self.max_depth, self.max_occ = max_tokens, max_depth, max_occ
        self.half = max(2, max_tokens // 2)
        self.newer = SuffixIndex(max_depth, max_occ)
        self.older: SuffixIndex | None = None
        self._queued: deque[list[int]] = deque()
        self._queued_tokens = 0

    @property
    def size(self) -> int:
        """Tokens held: both generations and the queue."""
        return len(self.newer) + (len(self.older) if self.older is not None else 0) + self._queued_tokens

    def add(self, output: list[int]) -> None:
        output = list(output[-(self.half - 1):])  # (with its SEP, one output fits a generation)
        if not output:
            return
        self._queued.append(output)
        self._queued_tokens += len(output) + 1
        while self._queued_tokens > self.max_tokens:  # older than anything the cap keeps
            self._queued_tokens -= len(self._queued.popleft()) + 1

    @property
    def indexes(self) -> tuple[SuffixIndex, ...]:
        """The generations, newest first, after indexing up to `max_per_read` queued outputs."""
        for _ in range(min(len(self._queued), self.max_per_read)):
            seq = self._queued.popleft()
            self._queued_tokens -= len(seq) + 1
            if len(self.newer) + len(seq) + 1 > self.half:
                self.older, self.newer = self.newer, SuffixIndex(self.max_depth, self.max_occ)
            self.newer.append_sequence(seq)
        return (self.newer,) if self.older is None else (self.newer, self.older)


class SuffixProposer:
    is_deterministic = True

    def __init__(
        self,
        max_depth: int = 32,
        request_depth: int = 8,
        min_prob: float = 0.1,
        spec_factor: float = 1.0,
        max_occurrences: int = 32,
        max_job_tokens: int = 65536,
        max_jobs: int = 64,
    ) -> None:
        self.max_depth, self.min_prob, self.spec_factor = max_depth, min_prob, spec_factor
        # A request's own index serves copying from its prompt, where 8 tokens of context
        # already pin the source span; shorter n-grams make building it per prompt ~3x cheaper
        # (it is built for every speculating request, so at large batches that cost shows).
        self.request_depth = min(request_depth, max_depth)
        self.max_occ, self.max_job_tokens, self.max_jobs = max_occurrences, max_job_tokens, max_jobs
        self._req: dict[str, SuffixIndex] = {}
        self._jobs: OrderedDict[str, _JobIndex] = OrderedDict()  # LRU over jobs

    def _sync(self, rid: str, hist: list[int]) -> SuffixIndex:
        idx = self._req.get(rid)
        if idx is not None and (len(hist) < len(idx) or (len(idx) and hist[len(idx) - 1] != idx.tokens[-1])):
            idx = None  # history rewritten: rebuild
        if idx is None:
            idx = self._req[rid] = SuffixIndex(self.request_depth, self.max_occ)
        if len(hist) > len(idx):
            idx.append(hist[len(idx):])
        return idx

    def propose_drafts(
        self,
        request_ids: list[str],
        token_ids: list[list[int]],
        k: list[int],
        job_ids: list[str | None] | None = None,
    ) -> list[Draft]:
        out: list[Draft] = []
        for i, (rid, hist, ki) in enumerate(zip(request_ids, token_ids, k)):
            idx = self._sync(rid, hist)
            if ki <= 0:
                out.append(Draft())
                continue
            ctx = hist[-self.max_depth:]
            best = idx.match(ctx, ki, self.min_prob, self.spec_factor, self_overlap=True)
            jid = job_ids[i] if job_ids else None
            job = self._jobs.get(jid) if jid is not None else None
            # A full draft every occurrence agrees on cannot be beaten on score: skip the job's
            # index (half the proposer's time when copying from the prompt).
            certain = len(best.tokens) == ki and best.score >= ki
            if job is not None and not certain:
                self._jobs.move_to_end(jid)
                d = match_generations(job.indexes, ctx, ki, self.min_prob, self.spec_factor)
                if (d.score, d.match_len) > (best.score, best.match_len):
                    best = d
            out.append(best)
        return out

    def propose(
        self,
        request_ids: list[str],
        token_ids: list[list[int]],
        k: list[int],
        job_ids: list[str | None] | None = None,
    ) -> list[list[int]]:
        return [d.tokens for d in self.propose_drafts(request_ids, token_ids, k, job_ids)]

    def on_finished(self, request_id: str, token_ids: list[int], job_id: str | None = None) -> None:
        self._req.pop(request_id, None)
        if job_id is None or not token_ids:
            return
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _JobIndex(self.max_job_tokens, self.max_depth, self.max_occ)
            while len(self._jobs) > self.max_jobs:
                self._jobs.popitem(last=False)
        self._jobs.move_to_end(job_id)
        job.add(token_ids)

    def drop_job(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
