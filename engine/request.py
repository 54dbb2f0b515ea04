"""One request's life in the engine: tokens, progress and its KV blocks."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    cache_salt: str = ""
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    # Tokens whose KV is in the cache (or is being written this step).
    num_computed_tokens: int = 0
    # Prompt tokens that came from the prefix cache on the latest admission.
    num_cached_tokens: int = 0
    # Positions below this are already in cached blocks; their KV is not rewritten.
    num_hit_tokens: int = 0
    # Draft tokens proposed for the next step (speculative decoding).
    spec_token_ids: list[int] = field(default_factory=list)
    blocks: list = field(default_factory=list)  # KVBlock objects, in order
    block_ids: list[int] = field(default_factory=list)  # their ids, kept beside them for input prep
    table_row: int = -1  # its row in the block manager's BlockTable while it holds blocks
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks already registered in the prefix cache
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    # Incremental detokenization state (only used with stop strings).
    text: str = ""
    _detok_prefix: int = 0
    _detok_read: int = 0
    spec_proposed: int = 0
    # Tokens sampled on the device whose ids the host has not seen yet (async output).
    num_pending: int = 0
    pending_row: int = -1  # row of the newest one in that step's sampled-token tensor
    # Drafts scored by the step in flight, whose acceptance only the device knows yet: the
    # next step's positions shift by the number accepted (applied on the device), and blocks
    # are reserved for all of them.
    inflight_drafts: list[int] = field(default_factory=list)
    num_unverified: int = 0
    # Tokens this step's drafts assume the step in flight produces (its drafts, all accepted,
    # then the proposer's guess at the next token), and the history length they follow.
    spec_assumed: list[int] = field(default_factory=list)
    spec_base: int = 0
    job_id: str | None = None
    spec_accepted: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return self.num_tokens + len(self.spec_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output + drafts, by slicing (no per-token calls)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:  # outputs, then drafts: no copy of the whole history
            o, a, b = self.output_token_ids, start - p, end - p
            if b <= len(o):
                return o[a:b]
            return o[a:] + self.spec_token_ids[max(0, a - len(o)):b - len(o)]
        return (self.prompt_token_ids + self.output_token_ids + self.spec_token_ids)[start:end]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
