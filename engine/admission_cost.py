"""Which way an admission's prefill should run while other requests decode, by costs measured
on the card at start-up.

Two ways: cut into chunks that ride along in decode-graph steps (one row per prompt token; no
eager launch), or one eager mixed step per `max_num_batched_tokens` (the extend kernel, one
launch of every layer's kernels). Which is cheaper depends on the card, the model and the dtype:
SmolLM2 in fp32 on the H200 runs its GEMMs on the CUDA cores, where a graph row costs about
0.017 ms (a 1,600-token admission: 27 ms of rows) while an eager 3,000-token step costs about
8 ms; in bf16 rows are nearly free and the eager step's launches dominate.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionCosts:
    graph_base_ms: float  # a decode-graph step of the fewest captured rows
    graph_row_ms: float  # each row more, up to the largest graph (prefill rows read their prefix)
    eager_base_ms: float  # an eager forward's fixed cost (launches), extrapolated to 0 tokens
    eager_token_ms: float  # each token more in an eager forward

    def graph_pays(self, pending: int, budget: int) -> bool:
        """Is carrying `pending` prompt tokens through decode-graph rows cheaper than eager mixed
        steps of up to `budget` tokens each? An eager step replaces a graph step that would run
        anyway, so only its excess over a graph step's base counts."""
        if pending <= 0:
            return True
        eager_steps = -(-pending // max(1, budget))
        eager = eager_steps * max(0.0, self.eager_base_ms - self.graph_base_ms) + pending * self.eager_token_ms
        return pending * self.graph_row_ms <= eager
