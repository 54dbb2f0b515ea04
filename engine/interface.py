"""The contract between the worker and any engine (paged engine, or the `hf` baseline).

The worker streams rows through `add_request` / `step`; each `step` returns the
requests that finished during it (and only those), so results go out as rows end.
"""
from __future__ import annotations

from typing import Protocol

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class Engine(Protocol):
    tokenizer: object  # a transformers tokenizer
    max_model_len: int

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    job_id: str | None = None) -> None:
        """Queue a request (job_id lets job-wide state, such as the suffix proposer's tree, learn). Problems with one request (too long, bad params) must not raise:
        they come back from the next `step` as a finished output with finish_reason 'error'."""

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return outputs of requests that finished in it."""

    def abort(self, request_id: str) -> None: ...

    def has_unfinished(self) -> bool: ...

    def num_unfinished(self) -> int: ...

    def stats(self) -> dict[str, float]:
        """Cumulative counters: prompt_tokens, cached_tokens, generated_tokens,
        spec_proposed, spec_accepted, kv_usage (0..1), preemptions, ..."""
