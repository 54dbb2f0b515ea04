"""The sampler draws exactly from softmax(logits / T) after top-k and top-p filtering
(chi-square on a tiny vocabulary), and greedy rows take the argmax."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from engine.request import Request
from engine.sampler import SamplingTensors, exponential_noise, sample
from engine.sampling_params import SamplingParams


def expected_probs(logits: np.ndarray, t: float, top_k: int, top_p: float) -> np.ndarray:
    """Straight from the definitions, one row, in float64."""
    z = logits / t
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    if top_k:  # top-k first, then top-p on what is left, renormalised (as vLLM and transformers do)
        p[order[top_k:]] = 0.0
        p /= p.sum()
    keep = np.zeros_like(p, dtype=bool)
    mass = 0.0
    for rank, i in enumerate(order):
        if p[i] == 0.0 or (rank > 0 and mass >= top_p):
            break
        keep[i] = True
        mass += p[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("t,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8),
                                           (0.9, 4, 0.9)])
def test_sampled_distribution_matches_filtered_softmax(t, top_k, top_p):
    V, N = 6, 120_000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, -0.5, -1.0])
    params = SamplingParams(temperature=t, top_k=top_k, top_p=top_p, max_tokens=1)
    reqs = [Request(f"r{i}", [1], params) for i in range(N)]
    st = SamplingTensors.from_requests(reqs, V, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1234)
    noise = exponential_noise(reqs, V, torch.device("cpu"), gen)
    tokens, _ = sample(logits.expand(N, V).clone(), st, noise)
    counts = np.bincount(tokens.numpy(), minlength=V)
    exp = expected_probs(logits.numpy().astype(np.float64), t, top_k, top_p)
    assert counts[exp == 0].sum() == 0, "a filtered-out token was sampled"
    live = exp > 0
    stat = chisquare(counts[live], exp[live] * N)
    assert stat.pvalue > 1e-3, (counts, exp * N)


def test_min_p_drops_unlikely_tokens_and_greedy_takes_argmax():
    V, N = 6, 20_000
    logits = torch.tensor([2.0, 1.9, 0.0, -1.0, -2.0, -3.0])
    sampled = Request("s", [1], SamplingParams(temperature=1.0, min_p=0.5))
    greedy = Request("g", [1], SamplingParams(temperature=0.0))
    reqs = [sampled] * N + [greedy]
    st = SamplingTensors.from_requests(reqs, V, torch.device("cpu"))
    noise = exponential_noise(reqs, V, torch.device("cpu"), torch.Generator().manual_seed(0))
    tokens, _ = sample(logits.expand(N + 1, V).clone(), st, noise)
    assert set(tokens[:N].tolist()) == {0, 1}  # p >= 0.5 * p_max keeps only the top two
    assert tokens[N].item() == 0
