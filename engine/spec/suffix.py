"""SuffixDecoding-style proposer (arXiv 2411.04975, `--speculative-method suffix`).

Two structures answer "which tokens followed the recent context before, how often?":
- per request: its own prompt + output (copying from the document being summarised/rewritten);
- per job: outputs already finished by other requests of the same job (batch jobs repeat
  JSON fields, templates, extraction formats).

Both are a `SuffixIndex` (`engine/spec/suffix_index.py`): the occurrences of every n-gram of
a ladder of lengths, keyed by rolling hashes. From the longest matched suffix a proposal follows
the most frequent continuation over the matching occurrences (the tree's heaviest child), and
stops when the estimated probability that the whole draft is right falls below `min_prob`.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque

from engine.spec.suffix_index import Draft, SuffixIndex, match_generations


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

    # Outputs indexed per read at most (the proposer reads once per call): a large batch's
    # tail (hundreds of outputs finished since the last read) is indexed over several steps
    # instead of stalling one.
    max_per_read = 16

    # Whether reading the index pays, judged per job from its drafts' later fate (`score`):
    # the tokens by which drafts it won matched the request's real continuation better than the
    # request's own index's draft would have, per request it was consulted for (faded by
    # `gain_decay` a score). After `warm` scores, a job below `min_gain` reads it only every
    # `recheck_every` calls, to score it afresh. Replayed proposer calls of SmolLM2 runs at
    # batch 32 (CPU): on extraction the job index was half the proposer's time and its drafts
    # matched no more than the requests' own (13,892 tokens against 13,917 without it); on JSON
    # filling it was half the time too, and matched 40% more (10,191 against 7,270).
    warm, min_gain, gain_decay, recheck_every = 128, 0.05, 0.99, 8

    def __init__(self, max_tokens: int, max_depth: int, max_occ: int) -> None:
        self.max_tokens, self.max_depth, self.max_occ = max_tokens, max_depth, max_occ
        self.half = max(2, max_tokens // 2)
        self.newer = SuffixIndex(max_depth, max_occ)
        self.older: SuffixIndex | None = None
        self._queued: deque[list[int]] = deque()
        self._queued_tokens = 0
        self.gain, self.scores, self.scored = 0.0, 0.0, 0  # faded gain and score count; scores seen
        self._calls = 0  # calls since the index was last read while judged not to pay

    def pays(self) -> bool:
        """Read the index this call? While it is judged not to pay, every `recheck_every`-th call."""
        if self.scored < self.warm or self.gain >= self.min_gain * self.scores:
            self._calls = 0
            return True
        self._calls += 1
        return self._calls % self.recheck_every == 0

    def score(self, gain: int) -> None:
        self.gain = self.gain * self.gain_decay + gain
        self.scores = self.scores * self.gain_decay + 1
        self.scored += 1

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
        # request id -> (history length, the job index's draft where it won (else None), the
        # request index's draft, job id) where the job index was read for it: scored once its
        # history has grown past that length
        self._consulted: dict[str, tuple[int, list[int] | None, list[int], str]] = {}
        # Seconds spent building indexes (a request's whole history at its second look, a
        # job's queued outputs), which the engine takes after each step's drafting: a one-time
        # cost per request or output, not what drafting costs from then on. (On the H200 in
        # bf16 one step's builds at batch 32 took 8.7 ms of a 15 ms drafting step; learned as
        # drafting's overhead, they switched drafting off for the rest of the run.)
        self.build_seconds = 0.0

    def _sync(self, rid: str, hist: list[int]) -> SuffixIndex:
        idx = self._req.get(rid)
        if idx is not None and (len(hist) < len(idx) or (len(idx) and hist[len(idx) - 1] != idx.tokens[-1])):
            idx = None  # history rewritten: rebuild
        if idx is None:  # a first look: held, not indexed (numpy scans answer it; see `hold`)
            idx = self._req[rid] = SuffixIndex(self.request_depth, self.max_occ)
            idx.hold(hist)
            return idx
        if len(hist) > len(idx):
            build = idx.lazy  # its first indexing: the whole history
            t0 = time.perf_counter() if build else 0.0
            idx.append(hist[len(idx):])
            if build:
                self.build_seconds += time.perf_counter() - t0
        return idx

    def propose_drafts(
        self,
        request_ids: list[str],
        token_ids: list[list[int]],
        k: list[int],
        job_ids: list[str | None] | None = None,
    ) -> list[Draft]:
        out: list[Draft] = []
        # A job's generations, read once per call: each read indexes up to `max_per_read` queued
        # outputs, and read per request a call at batch 32 could index hundreds at once (a probe
        # at the tail of a batch-256 run: 4 ms of host time in one step).
        gens: dict[str, tuple[SuffixIndex, ...] | None] = {}
        for i, (rid, hist, ki) in enumerate(zip(request_ids, token_ids, k)):
            idx = self._sync(rid, hist)
            if rid in self._consulted:
                self._score(rid, hist)
            if ki <= 0:
                out.append(Draft())
                continue
            ctx = hist[-self.max_depth:]
            # (ctx ends the request's own index: its prefix hashes key every suffix of ctx)
            best = idx.match(ctx, ki, self.min_prob, self.spec_factor, self_overlap=True, tail=idx)
            jid = job_ids[i] if job_ids else None
            job = self._jobs.get(jid) if jid is not None else None
            # A full draft every occurrence agrees on cannot be beaten on score: skip the job's
            # index (half the proposer's time when copying from the prompt).
            certain = len(best.tokens) == ki and best.score >= ki
            if job is not None and not certain:
                if jid not in gens:
                    self._jobs.move_to_end(jid)
                    gens[jid] = None
                    if job.pays():
                        t0 = time.perf_counter()
                        gens[jid] = job.indexes  # (indexes queued outputs)
                        self.build_seconds += time.perf_counter() - t0
                if gens[jid] is not None:
                    d = match_generations(gens[jid], ctx, ki, self.min_prob, self.spec_factor, tail=idx)
                    won = (d.score, d.match_len) > (best.score, best.match_len)
                    self._consulted[rid] = (len(hist), d.tokens if won else None, best.tokens, jid)
                    if won:
                        best = d
            out.append(best)
        return out

    def _score(self, rid: str, hist: list[int]) -> None:
        """Once the history has grown past a request's last consultation of its job's index: how
        many more of the real next tokens the job index's draft matched than the request's own
        draft did (0 where the job's draft did not win)."""
        L, won, own, jid = self._consulted[rid]
        if len(hist) <= L:
            return
        del self._consulted[rid]
        job = self._jobs.get(jid)
        if job is not None:
            truth = hist[L:L + max(len(won or ()), len(own))]
            job.score(_matched(won, truth) - _matched(own, truth) if won is not None else 0)

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
        self._consulted.pop(request_id, None)
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


def _matched(draft: list[int], truth: list[int]) -> int:
    """Leading tokens of the draft equal to the truth's."""
    n = 0
    for a, b in zip(draft, truth):
        if a != b:
            break
        n += 1
    return n
