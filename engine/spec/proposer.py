"""The proposer interface the engine calls once per step for the speculating requests.

Contract:
- `token_ids[i]` is request i's full accepted history (prompt + outputs so far). It only
  grows between calls (rejected drafts never enter it); a proposer that sees it shrink or
  change rebuilds its state for that request (preemption/recompute is allowed, just slower).
- Return at most `k[i]` tokens per request; fewer or none is fine (k[i] == 0 -> []).
- `on_finished` frees per-request state (call it on finish *and* abort); proposers that
  learn across a job (suffix) use the outputs there.
- Optional: a `build_seconds` attribute, the seconds spent so far on one-time index builds,
  which the engine reads and resets after each step's drafting and leaves out of what it
  learns drafting costs.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Proposer(Protocol):
    # True when q is a point mass on the proposed token (n-gram, suffix): verification then
    # needs no draft_probs.
    is_deterministic: bool

    def propose(
        self,
        request_ids: list[str],
        token_ids: list[list[int]],
        k: list[int],
        job_ids: list[str | None] | None = None,
    ) -> list[list[int]]: ...

    def on_finished(self, request_id: str, token_ids: list[int], job_id: str | None = None) -> None:
        """`token_ids`: the request's *output* tokens (not the prompt)."""


@runtime_checkable
class ProbabilisticProposer(Proposer, Protocol):
    """Draft-model style proposers (is_deterministic = False). Written by the engine side."""

    def propose_with_probs(
        self,
        request_ids: list[str],
        token_ids: list[list[int]],
        k: list[int],
        job_ids: list[str | None] | None = None,
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Per request: draft tokens (n_i <= k[i]) and q probs [n_i, vocab] that the tokens
        were sampled from (after the draft's own temperature/top-p processing).
        Pad them into draft_probs [N, k_max, V] for `rejection_sample`."""
        ...
