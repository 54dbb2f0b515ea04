"""Batched sampling on the device: greedy, temperature, top-k, top-p and min-p.

Sampling uses the exponential race (argmax p/E with E ~ Exp(1)), which draws
exactly from p. A seeded request draws its noise from its own generator, so its
tokens do not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request
from engine.spec.rejection import counter_noise


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [N] float32, 0 for greedy rows
    top_k: torch.Tensor  # [N] int64, vocab size when off
    top_p: torch.Tensor  # [N] float32
    min_p: torch.Tensor  # [N] float32
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool

    @classmethod
    def from_requests(cls, reqs: list[Request], vocab: int, device: torch.device) -> "SamplingTensors":
        ps = [r.params for r in reqs]
        temps = [0.0 if p.greedy else float(p.temperature) for p in ps]
        if not any(temps):  # all greedy: argmax needs no per-row settings on the device
            return cls(None, None, None, None, True, False, False, False)
        ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in ps]
        tps = [float(p.top_p) for p in ps]
        mps = [float(p.min_p) for p in ps]
        # One pinned, non-blocking copy: a pageable copy would wait for the GPU's queue.
        host = torch.tensor([temps, ks, tps, mps], dtype=torch.float32)
        if device.type == "cuda":
            host = host.pin_memory()
        t = host.to(device, non_blocking=True)
        return cls(
            temperature=t[0], top_k=t[1].long(), top_p=t[2], min_p=t[3], all_greedy=False,
            any_top_k=any(k < vocab for k in ks), any_top_p=any(p < 1.0 for p in tps),
            any_min_p=any(m > 0.0 for m in mps),
        )

    def repeat(self, counts: torch.Tensor) -> "SamplingTensors":
        """One row per scored position (speculative verification scores k+1 per request)."""
        if self.all_greedy:
            return self
        rep = lambda t: t.repeat_interleave(counts)  # noqa: E731
        return SamplingTensors(rep(self.temperature), rep(self.top_k), rep(self.top_p), rep(self.min_p),
                               self.all_greedy, self.any_top_k, self.any_top_p, self.any_min_p)


def processed_probs(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p; rows are float32."""
    logits = logits.float()
    temp = torch.where(st.temperature > 0, st.temperature, torch.ones_like(st.temperature))
    logits = logits / temp.unsqueeze(1)
    if st.any_top_k or st.any_top_p:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if st.any_top_k:
            ranks = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
            mask |= ranks >= st.top_k.unsqueeze(1)
        if st.any_top_p:
            probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(-1)
            # Drop a token once the mass before it already reaches top_p; the top one always stays.
            mass_before = probs.cumsum(-1) - probs
            mask |= mass_before >= st.top_p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, idx, sorted_logits)
    probs = logits.softmax(-1)
    if st.any_min_p:
        cut = probs.max(-1, keepdim=True).values * st.min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < cut, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def exponential_noise(reqs: list[Request], vocab: int, device: torch.device,
                      default: torch.Generator | None, rows_per_req: list[int] | None = None,
                      offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Exp(1) noise, one row per scored position. A seeded request's noise is a hash of
    (seed, output position), so its tokens depend neither on the batch nor on speculation.
    `offsets` [N] (on the device): output positions beyond the host's count, from drafts a
    step still in flight accepted."""
    rows = rows_per_req or [1] * len(reqs)
    noise = torch.empty(sum(rows), vocab, device=device)
    noise.exponential_(generator=default)
    r = 0
    for j, (req, n) in enumerate(zip(reqs, rows)):
        if req.params.seed is not None:
            pos = len(req.output_token_ids) + torch.arange(n, device=device)
            if offsets is not None:
                pos = pos + offsets[j]
            seed = torch.tensor([req.params.seed], device=device)
            noise[r:r + n] = counter_noise(seed, pos[None, :], vocab).exp[0]
        r += n
    return noise


def sample(logits: torch.Tensor, st: SamplingTensors, noise: torch.Tensor | None,
           want_logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns token ids [N] and, when asked, the model's logprob of each chosen token."""
    greedy_tokens = logits.argmax(-1)
    if st.all_greedy:
        tokens = greedy_tokens
    else:
        probs = processed_probs(logits, st)
        sampled = (probs / noise).argmax(-1)
        tokens = torch.where(st.temperature > 0, sampled, greedy_tokens)
    logprobs = None
    if want_logprobs:
        logprobs = logits.float().log_softmax(-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, logprobs
