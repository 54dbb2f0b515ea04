"""Decode bursts (`num_scheduler_steps`, as vLLM named multi-step scheduling): when every
request of a step only decodes, run several decode steps back to back on the device from
one host step. Each step after the first takes its input tokens from the step before it and
moves positions, contexts and KV slots on by one, on the device; the host sees the tokens
once, after the burst.

Why: where the GPU's step is short (a small model, and cascade attention reading shared
prefixes once), the host's per-request work at batch 256 (scheduling, building the inputs,
reading back tokens, stop checks) takes longer than the forward, so the GPU waits. A burst of
N pays for that work once per N tokens: on the SmolLM2 shape with cascade, workload (a) of the
prefix bench went from 1.34 s to 1.14 s with N = 4 (docs/benchmarks.md). The price: a request
that stops mid-burst computes up to N - 1 tokens that are thrown away, and requests waiting
for a slot are admitted only between bursts.
"""
from __future__ import annotations

import torch

from engine.block_manager import BlockManager
from engine.scheduler import ScheduledBatch


def burst_length(batch: ScheduledBatch, max_steps: int, max_model_len: int, bm: BlockManager) -> int:
    """Steps to run for this batch (1: an ordinary step). A burst needs every request to be
    decoding its newest token (no prefill chunk, no drafts), no logprobs, room in the model's
    context for every step, and KV blocks for all of them (reserved here)."""
    if max_steps <= 1 or not batch.requests or batch.errors:
        return 1
    n = max_steps
    for req, k in zip(batch.requests, batch.num_tokens):
        if k != 1 or req.num_computed_tokens + 1 != req.num_tokens or req.spec_token_ids \
                or req.num_unverified or req.params.logprobs:
            return 1
        n = min(n, max_model_len - req.num_tokens + 1)
    if n <= 1:
        return 1
    for req in batch.requests:
        # Blocks a burst reserves early are simply the request's next blocks; if the pool runs
        # short the batch decodes one step at a time, and the scheduler preempts as usual.
        if not bm.allocate_slots(req, n):
            return 1
    return n


def advance_decode_inputs(inp, tokens: torch.Tensor, block_size: int) -> None:
    """Turn a decode step's inputs (one row per request) into the next step's, in place on
    the device: this step's sampled tokens become the inputs, positions and contexts move on
    by one, and each row's KV slot is looked up again in its block table."""
    m = inp.meta
    inp.input_ids.copy_(tokens)
    inp.positions.add_(1)
    m.context_lens.add_(1)
    pos = inp.positions
    block = m.block_tables.gather(1, torch.div(pos, block_size, rounding_mode="floor").unsqueeze(1)).squeeze(1)
    m.slot_mapping.copy_(block.to(torch.int64) * block_size + pos % block_size)
    if m.cascade is not None:
        # Shared prefixes stay as planned; the new token lands in each row's own suffix (whose
        # table already holds the blocks the burst reserved).
        m.cascade.suffix_lens.add_(1)
