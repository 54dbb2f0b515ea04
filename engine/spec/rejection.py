"""Exact speculative verification (rejection sampling), batched in torch, any device.

Rule (Leviathan et al. / Chen et al.): accept draft x with prob min(1, p(x)/q(x)); on the first
rejection emit a sample from normalize(max(p - q, 0)); if all drafts pass, emit a bonus token
from p at the position after the last draft.

Deterministic proposers (q = point mass on x) use a Gumbel-max coupling: y = argmax(p / E)
with E ~ Exp(1) is a sample from p; accept iff y == x (probability p(x)); on rejection y is
distributed as p with x removed -- exactly the rule above. The emitted token at each position
is then always y, i.e. the same token non-speculative sampling with the same noise gives, so
seeded output does not depend on k or on whether speculation ran at all.

Randomness comes in a `SpecNoise`, built either from per-row torch.Generators or from a
counter-based hash of (seed, absolute token position), which makes a seeded row's output
independent of batch composition, padding, k, and device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SpecNoise:
    exp: torch.Tensor      # [N, K+1, V] Exp(1) noise for sampling at each position
    uniform: torch.Tensor  # [N, K] U(0,1) acceptance draws (probabilistic drafts only)


@dataclass
class SpecOutput:
    tokens: torch.Tensor        # [N, K+1] int64, emitted tokens, padded with -1
    num_accepted: torch.Tensor  # [N] int64; emitted per row = num_accepted + 1


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # murmur3 fmix32 on int64 tensors holding 32-bit values. Products wrap in int64 but the
    # low 32 bits (all we keep) are exact, so CPU and CUDA agree bit for bit.
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _hash_uniform(seed: torch.Tensor, pos: torch.Tensor, lane: torch.Tensor, salt: int) -> torch.Tensor:
    """U(0,1) float32 from hash(seed, position, lane, salt); shapes broadcast."""
    h = _mix32((seed & _M32) ^ ((seed >> 32) & _M32) * 0x27D4EB2F ^ salt)
    h = _mix32(h ^ ((pos & _M32) * 0x165667B1 & _M32))
    h = _mix32(h ^ lane)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def counter_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> SpecNoise:
    """Noise keyed by (seed, absolute position of the token being sampled).

    seeds: [N] int64 per request; positions: [N, K+1] int64, the output index (or total length)
    of each verified position (row i: start_i + arange(K+1)). The same (seed, position) always
    gets the same noise, so results are reproducible across batches, k and devices."""
    dev = positions.device
    seeds = seeds.to(device=dev, dtype=torch.int64)
    positions = positions.to(torch.int64)
    lane = torch.arange(vocab_size, device=dev, dtype=torch.int64)
    u = _hash_uniform(seeds[:, None, None], positions[:, :, None], lane, salt=0x9E3779B9)
    acc = _hash_uniform(seeds[:, None], positions[:, :-1], torch.zeros((), dtype=torch.int64, device=dev), salt=0x7F4A7C15)
    return SpecNoise(exp=-torch.log(u), uniform=acc)


def generator_noise(
    generators: list[torch.Generator | None],
    num_draft: torch.Tensor,
    k_max: int,
    vocab_size: int,
    device: torch.device | str,
) -> SpecNoise:
    """Noise from per-row generators (None rows share the global RNG in one batched draw).

    A seeded row consumes exactly (num_draft[i] + 1) * (V + 1) draws, independent of the other
    rows and of padding; it is reproducible given the same k per step (use `counter_noise`
    when k itself may vary with load)."""
    n = len(generators)
    exp = torch.empty(n, k_max + 1, vocab_size, device=device).exponential_()
    uni = torch.rand(n, k_max, device=device)
    nd = num_draft.tolist()
    for i, g in enumerate(generators):  # loop over rows, never over vocab
        if g is not None:
            m = int(nd[i])
            exp[i, : m + 1] = torch.empty(m + 1, vocab_size, device=device).exponential_(generator=g)
            if m:
                uni[i, :m] = torch.rand(m, device=device, generator=g)
    return SpecNoise(exp=exp, uniform=uni)


def _gumbel_argmax(probs: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    # argmax(p / E) ~ Categorical(p); clamp keeps E = 0 (measure zero) from making inf/nan
    return (probs / exp.clamp_min(1e-20)).argmax(dim=-1)


def rejection_sample(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_draft: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    greedy: torch.Tensor | None = None,
    target_argmax: torch.Tensor | None = None,
    noise: SpecNoise | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SpecOutput:
    """Verify drafts for N sequences at once.

    target_probs [N, K+1, V]: target distribution at each draft position plus the bonus one,
      already temperature/top-k/top-p processed (rows beyond num_draft[i] + 1 are ignored).
    draft_tokens [N, K] (any padding value), num_draft [N] in 0..K.
    draft_probs [N, K, V] or None for a point-mass (deterministic) proposer.
    greedy [N] bool: such rows accept iff draft == argmax of the target and emit exactly the
      greedy tokens. target_argmax [N, K+1] (argmax of the raw logits) overrides the argmax
      of target_probs for them -- pass it when greedy rows' probs are not meaningful.
    noise: see counter_noise / generator_noise; else drawn from `generators` or the global RNG.
    """
    N, K1, V = target_probs.shape
    K = K1 - 1
    dev = target_probs.device
    num_draft = num_draft.to(device=dev, dtype=torch.int64)
    if noise is None:
        gens = generators if generators is not None else [None] * N
        noise = generator_noise(gens, num_draft, K, V, dev)
    pos = torch.arange(K1, device=dev)
    valid = pos[:K] < num_draft[:, None]                       # [N, K]
    drafts = draft_tokens.to(device=dev, dtype=torch.int64).clamp(0, V - 1)

    sampled = _gumbel_argmax(target_probs, noise.exp)          # [N, K+1] a sample from p_j
    if greedy is not None and bool(greedy.any()):
        tgt = target_argmax.to(dev, torch.int64) if target_argmax is not None else target_probs.argmax(-1)
        sampled = torch.where(greedy.to(dev)[:, None], tgt, sampled)
        is_greedy = greedy.to(dev)
    else:
        is_greedy = torch.zeros(N, dtype=torch.bool, device=dev)

    if draft_probs is None:
        accept = sampled[:, :K] == drafts
        final = sampled  # recovered token on rejection and bonus token alike
    else:
        p_x = target_probs[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
        q_x = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
        accept_prob = noise.uniform * q_x < p_x                  # u < p/q without dividing by 0
        accept = torch.where(is_greedy[:, None], sampled[:, :K] == drafts, accept_prob)
        resid = (target_probs[:, :K] - draft_probs).clamp_min(0)
        # p == q leaves no residual; rejection then has probability 0, fall back to p anyway
        empty = resid.sum(-1, keepdim=True) <= 0
        resid = torch.where(empty, target_probs[:, :K], resid)
        recovered = _gumbel_argmax(resid, noise.exp[:, :K])
        # at j < num_draft a rejection emits `recovered`; at j == num_draft the bonus from p
        final = sampled.clone()
        use_rec = valid & ~is_greedy[:, None]
        final[:, :K] = torch.where(use_rec, recovered, sampled[:, :K])

    accept = accept & valid
    num_acc = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)  # leading accepts
    # emitted: drafts before num_acc, then final[num_acc]
    drafts_k1 = torch.cat([drafts, drafts.new_zeros(N, 1)], dim=1)
    out = torch.where(pos[None, :] < num_acc[:, None], drafts_k1, final)
    out = torch.where(pos[None, :] <= num_acc[:, None], out, torch.full_like(out, -1))
    return SpecOutput(tokens=out, num_accepted=num_acc)
