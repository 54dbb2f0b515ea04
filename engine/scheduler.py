"""Continuous batching with one rule (as in vLLM V1): every request has
`num_computed_tokens` and a target (prompt + outputs + drafts); each step grants
tokens under a budget so requests catch up. Prefill chunks, prefix hits and
speculative tokens all follow from that rule. Running requests go first.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens granted per request
    preempted: list[Request] = field(default_factory=list)
    errors: list[Request] = field(default_factory=list)  # rejected at admission

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int) -> None:
        self.config = config
        self.bm = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Hook: reorders the waiting queue before admission (prefix grouping).
        self.waiting_order: Callable[[deque[Request]], deque[Request]] | None = None
        # Admitting a request into a pure decode batch turns a CUDA-graph step into an eager
        # mixed one. On the GPU the engine sets this so admissions gather until this many
        # sequence slots are free (or every waiting request fits), within max_admission_wait steps.
        self.min_admission_slots = 1
        self.max_admission_wait = 8
        self._admission_wait = 0
        # On the GPU a step with prefill chunks replays a decode graph (one row per token) when
        # its rows fit the largest graph and read at most `graph_reads` KV positions (see
        # ModelRunner.prepare); the engine sets both. While requests decode, prefill chunks
        # are cut to fit, so an admission is a few graph replays instead of an eager step that
        # stalls every decoding request (0: no cut).
        self.graph_rows = 0
        self.graph_reads = 0
        self.max_cut_steps = 8

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def _preempt(self, req: Request) -> None:
        # Recompute later: drop its KV, keep its tokens.
        self.bm.free(req)
        req.num_computed_tokens = 0
        req.num_hit_tokens = 0
        req.spec_token_ids = []
        req.num_unverified = 0  # its tokens in flight still land; their KV is gone anyway
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill

        # Hashes of full blocks this step computes, so a waiting request that shares
        # them waits one step and hits instead of computing them again.
        computing: set[bytes] = set()
        prefilling = not self.running  # an idle engine admits at once
        # Made at the step's first prefill chunk (most steps have none: no scan of `running`).
        room: _GraphRoom | None = None
        room_made = not self.graph_rows

        # 1. Running requests, oldest first; the newest is preempted when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens_with_spec - req.num_computed_tokens, budget)
            # Never compute past the model's context (drafts included).
            n = min(n, self.max_model_len - req.num_computed_tokens)
            if req.num_computed_tokens < req.num_prompt_tokens:
                if not room_made:
                    room, room_made = self._graph_room(), True
                if room is not None:
                    n = room.cut(req.num_computed_tokens, n)
            if n <= 0:
                i += 1
                continue
            # Room too for the drafts of the step in flight: as many as are accepted shift
            # this step's tokens to later positions.
            while not self.bm.allocate_slots(req, n + req.num_unverified):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.requests.append(req)
                out.num_tokens.append(n)
                if req.num_computed_tokens < req.num_prompt_tokens:  # a prefill chunk
                    prefilling = True
                    self._note_computing(req, req.num_computed_tokens, n, computing)
                budget -= n
                i += 1
                continue
            # req itself was preempted; running[i] now holds the next request.

        # 2. Waiting requests, while budget, sequence slots and blocks last.
        if self.waiting and not prefilling and not self._admission_due():
            return out
        if self.waiting_order is not None and self.waiting:
            self.waiting = self.waiting_order(self.waiting)
        # Requests whose next block another request computes this step step aside (keeping their
        # place in the queue) and are admitted next step as hits; the ones behind them go on.
        deferred: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending:
                break  # preempted while its last token was on the device: admit once it lands
            if req.num_prompt_tokens >= self.max_model_len:
                self.waiting.popleft()
                req.error = (f"prompt has {req.num_prompt_tokens} tokens; the model's context "
                             f"(max_model_len) is {self.max_model_len}, leaving no room to generate")
                out.errors.append(req)
                continue
            hits = self.bm.get_computed_blocks(req) if req.num_computed_tokens == 0 else []
            num_hit = len(hits) * self.bm.block_size
            if len(hits) < len(req.block_hashes) and req.block_hashes[len(hits)] in computing:
                if len(deferred) >= self.config.max_num_seqs:
                    break
                deferred.append(self.waiting.popleft())
                continue
            n = req.num_tokens - num_hit
            if n > budget:
                if not chunked and req.num_prompt_tokens <= self.config.max_num_batched_tokens:
                    break
                n = budget
            if chunked:
                if not room_made:
                    room, room_made = self._graph_room(), True
                if room is not None:
                    n = room.cut(num_hit, n)
                    if n == 0:
                        break  # the step's graph is full: admitted next step
            req.num_computed_tokens = num_hit
            if not self.bm.allocate_slots(req, n, hits):
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.bm.record_admission(req, len(hits))
            self._note_computing(req, num_hit, n, computing)
            req.num_hit_tokens = num_hit
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        return out

    def _graph_room(self) -> "_GraphRoom | None":
        """What prefill chunks may add to this step and still run through a decode graph: None
        when no request decodes (a step of prefills alone runs eagerly anyway, and the extend
        kernel is the faster one there) or nothing is left to prefill."""
        rows = reads = pending = 0
        for r in self.running:
            s = r.num_computed_tokens
            if s < r.num_prompt_tokens:
                pending += r.num_prompt_tokens - s
                continue
            n = r.num_tokens_with_spec - s
            rows += n
            reads += n * s + n * (n + 1) // 2
        free = self.config.max_num_seqs - len(self.running)
        for i in range(min(free, len(self.waiting))):
            pending += self.waiting[i].num_tokens
        room = self.graph_rows - rows
        # A bulk prefill (a job's start: hundreds of prompts while the first ones already
        # decode) runs eagerly in full chunks: through graph-sized ones it took 1.1-1.3x the
        # steps at batch 256 (H200). Cutting is for admissions a few graph steps can take.
        if not rows or not pending or room <= 0 or pending > self.max_cut_steps * room:
            return None
        return _GraphRoom(room, self.graph_reads - reads)

    def _admission_due(self) -> bool:
        free = self.config.max_num_seqs - len(self.running)
        want = min(len(self.waiting), self.min_admission_slots)
        if free >= max(1, want) or self._admission_wait >= self.max_admission_wait:
            self._admission_wait = 0
            return True
        self._admission_wait += 1
        return False

    def _note_computing(self, req: Request, start: int, n: int, computing: set[bytes]) -> None:
        if not self.bm.enable_prefix_caching:
            return
        bs = self.bm.block_size
        hashes = req.block_hashes
        for i in range(start // bs, min(len(hashes), (start + n) // bs)):
            computing.add(hashes[i])

    def finish(self, req: Request, reason: str) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.bm.free(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def abort(self, request_id: str) -> Request | None:
        for q in (self.running, self.waiting):
            for req in q:
                if req.request_id == request_id:
                    if q is self.waiting:
                        self.waiting.remove(req)
                        self.bm.free(req)
                        req.status = RequestStatus.FINISHED
                        req.finish_reason = "abort"
                    else:
                        self.finish(req, "abort")
                    return req
        return None


@dataclass
class _GraphRoom:
    """Rows and KV reads left in a decode-graph step for prefill chunks. A chunk of n tokens
    from position s reads n*s + n*(n+1)/2 positions as decode rows."""
    rows: int
    reads: int
    # Cut a chunk only if what is left of it still makes real progress: at least this many
    # tokens, and at least a quarter of what it asked for. A sliver left for the step's first
    # chunk makes the step eager, uncut (one eager step beats many tiny chunks, each delaying
    # the prompt's first token); for a later chunk it means 0 tokens: wait for the next step.
    min_tokens: int = 64
    eager: bool = False
    used: bool = False

    def cut(self, start: int, n: int) -> int:
        if self.eager:
            return n
        # the largest m with m*start + m*(m+1)/2 <= reads
        b = start + 0.5
        m = min(self.rows, int(math.sqrt(b * b + 2 * self.reads) - b)) if self.reads > 0 else 0
        if m < n:
            if m < min(n, max(self.min_tokens, n // 4)):
                if self.used:
                    return 0
                self.eager = True
                return n
            n = m
        self.used = True
        self.rows -= n
        self.reads -= n * start + n * (n + 1) // 2
        return n
