"""What the engine hands back for a request."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None  # "stop", "length", or "error"
    error: str | None = None
    logprobs: list[float] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    first_token_time: float | None = None  # monotonic seconds
    arrival_time: float = 0.0
    finish_time: float | None = None
    metrics: dict = field(default_factory=dict)
