"""Exactness of speculative verification: greedy equals argmax decoding, sampled output keeps
the target distribution (chi-square on a tiny vocabulary), seeds reproduce."""
from __future__ import annotations

import math

import pytest
import torch

from engine.spec.ngram import NgramProposer
from engine.spec.rejection import counter_noise, generator_noise, rejection_sample

ALPHA = 1e-3  # chi-square rejection level; all RNGs are seeded so the tests are deterministic


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness-of-fit p-value; cells with p == 0 must be empty."""
    counts, probs = counts.double(), probs.double()
    zero = probs <= 0
    assert counts[zero].sum() == 0, f"sampled impossible tokens: {counts[zero]}"
    n = counts.sum()
    exp = n * probs[~zero]
    stat = ((counts[~zero] - exp) ** 2 / exp).sum()
    df = int((~zero).sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def rand_probs(g: torch.Generator, V: int, zeros: int = 1) -> torch.Tensor:
    p = torch.rand(V, generator=g, dtype=torch.float64) ** 2 + 0.02
    p[torch.randperm(V, generator=g)[:zeros]] = 0  # top-k/top-p leave zeros; include them
    return (p / p.sum()).float()


# -- a toy context-dependent "model" for decode equivalence -------------------------------
V_TOY = 40
_TABLE = torch.randn(997, V_TOY, generator=torch.Generator().manual_seed(7)) * 3


def toy_probs(ctx: list[int]) -> torch.Tensor:
    # depends on the last 3 tokens; peaked enough that copying sometimes works
    h = (ctx[-1] * 131 + (ctx[-2] if len(ctx) > 1 else 0) * 31 + (ctx[-3] if len(ctx) > 2 else 0)) % 997
    return torch.softmax(_TABLE[h], -1)


def plain_decode(prompt: list[int], steps: int, seed: int | None) -> list[int]:
    seq = list(prompt)
    for t in range(steps):
        p = toy_probs(seq)[None, None]
        if seed is None:
            seq.append(int(p.argmax()))
        else:
            noise = counter_noise(torch.tensor([seed]), torch.tensor([[t]]), V_TOY)
            seq.append(int((p / noise.exp).argmax()))
    return seq[len(prompt):]


def spec_decode(prompts: list[list[int]], steps: int, seeds: list[int | None], k: int, corrupt: float):
    """Speculative decode of a batch with an n-gram proposer whose drafts are partly corrupted."""
    g = torch.Generator().manual_seed(3)
    prop = NgramProposer(1, 3)
    seqs = [list(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    while any(len(o) < steps for o in outs):
        live = [i for i in range(len(prompts)) if len(outs[i]) < steps]
        ks = [min(k, steps - len(outs[i]) - 1) for i in live]
        drafts = prop.propose([str(i) for i in live], [seqs[i] for i in live], ks)
        for d in drafts:
            for j in range(len(d)):
                if torch.rand((), generator=g) < corrupt:
                    d[j] = int(torch.randint(V_TOY, (), generator=g))
        K = max(1, max(len(d) for d in drafts))
        tp = torch.zeros(len(live), K + 1, V_TOY)
        dt = torch.full((len(live), K), -1, dtype=torch.long)
        for r, (i, d) in enumerate(zip(live, drafts)):
            for j in range(len(d) + 1):
                tp[r, j] = toy_probs(seqs[i] + d[:j])
            dt[r, : len(d)] = torch.tensor(d, dtype=torch.long)
        nd = torch.tensor([len(d) for d in drafts])
        greedy = torch.tensor([seeds[i] is None for i in live])
        sd = torch.tensor([seeds[i] or 0 for i in live])
        pos = torch.tensor([len(outs[i]) for i in live])[:, None] + torch.arange(K + 1)
        res = rejection_sample(tp, dt, nd, greedy=greedy, noise=counter_noise(sd, pos, V_TOY))
        assert bool((res.num_accepted <= nd).all())
        for r, i in enumerate(live):
            em = res.tokens[r, : int(res.num_accepted[r]) + 1].tolist()
            assert -1 not in em and all(t == -1 for t in res.tokens[r, len(em):].tolist())
            seqs[i] += em
            outs[i] += em
    return [o[:steps] for o in outs]


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    base = torch.randint(V_TOY, (30,), generator=g).tolist()
    return [base + base[:12], base[5:] * 2, torch.randint(V_TOY, (20,), generator=g).tolist()]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_identical_to_argmax_decode(k):
    prompts = _prompts()
    spec = spec_decode(prompts, 48, [None] * 3, k=k, corrupt=0.3)
    assert spec == [plain_decode(p, 48, None) for p in prompts]


def test_seeded_sampling_equals_nonspeculative_and_ignores_k():
    # Gumbel coupling + counter noise: deterministic drafts change speed, never the tokens.
    prompts = _prompts()
    seeds = [123, 456, 789]
    ref = [plain_decode(p, 40, s) for p, s in zip(prompts, seeds)]
    assert spec_decode(prompts, 40, seeds, k=4, corrupt=0.3) == ref
    assert spec_decode(prompts, 40, seeds, k=2, corrupt=0.0) == ref
    # batch composition: a seeded row alone gives the same as in a mixed batch
    assert spec_decode(prompts[1:2], 40, seeds[1:2], k=5, corrupt=0.5) == ref[1:2]


def _trial_batch(p0, p1, N):
    return torch.stack([p0, p1, p1], 0)[None].expand(N, 3, -1).contiguous()


@pytest.mark.parametrize("V", [5, 8])
@pytest.mark.parametrize("noise_kind", ["global", "counter"])
def test_distribution_deterministic_drafts(V, noise_kind):
    g = torch.Generator().manual_seed(100 + V)
    torch.manual_seed(1000 + V)
    N = 200_000
    p0, p1 = rand_probs(g, V), rand_probs(g, V)
    tp = _trial_batch(p0, p1, N)
    # drafts: arbitrary fixed tokens (including zero-probability ones), independent of noise
    drafts = torch.randint(V, (N, 2), generator=g)
    nd = torch.full((N,), 2)
    noise = counter_noise(torch.arange(N) * 7919 + V, torch.zeros(N, 3, dtype=torch.long), V) if noise_kind == "counter" else None
    res = rejection_sample(tp, drafts, nd, noise=noise)
    first = res.tokens[:, 0]
    assert chi2_pvalue(torch.bincount(first, minlength=V), p0) > ALPHA
    # acceptance rate of the first draft equals E[p0(x)]
    acc1 = (res.num_accepted >= 1).double().mean()
    assert abs(acc1 - p0[drafts[:, 0]].double().mean()) < 4 * math.sqrt(0.25 / N)
    sel = res.num_accepted >= 1
    assert chi2_pvalue(torch.bincount(res.tokens[sel, 1], minlength=V), p1) > ALPHA
    # conditioned on the first draft being rejected, the token is p without the draft
    for x in range(V):
        m = (res.num_accepted == 0) & (drafts[:, 0] == x)
        if p0[x] < 1:
            q = p0.clone(); q[x] = 0; q /= q.sum()
            assert chi2_pvalue(torch.bincount(first[m], minlength=V), q) > ALPHA


@pytest.mark.parametrize("V", [5, 8])
def test_distribution_probabilistic_drafts(V):
    g = torch.Generator().manual_seed(200 + V)
    torch.manual_seed(2000 + V)
    N = 200_000
    p0, p1 = rand_probs(g, V), rand_probs(g, V)
    q0, q1 = rand_probs(g, V, zeros=0), rand_probs(g, V, zeros=1)
    tp = _trial_batch(p0, p1, N)
    dp = torch.stack([q0, q1])[None].expand(N, 2, V).contiguous()
    drafts = torch.stack([torch.multinomial(q0, N, True, generator=g), torch.multinomial(q1, N, True, generator=g)], 1)
    res = rejection_sample(tp, drafts, torch.full((N,), 2), draft_probs=dp)
    assert chi2_pvalue(torch.bincount(res.tokens[:, 0], minlength=V), p0) > ALPHA
    sel = res.num_accepted >= 1
    assert chi2_pvalue(torch.bincount(res.tokens[sel, 1], minlength=V), p1) > ALPHA
    # expected acceptance of the first draft: sum min(p, q)
    acc1 = float((res.num_accepted >= 1).double().mean())
    assert abs(acc1 - float(torch.minimum(p0, q0).sum())) < 4 * math.sqrt(0.25 / N)
    # bonus token after two accepts also follows p (position 2 row = p1 here)
    sel2 = res.num_accepted == 2
    assert chi2_pvalue(torch.bincount(res.tokens[sel2, 2], minlength=V), p1) > ALPHA


def test_mixed_batch_padding_and_greedy_rows():
    g = torch.Generator().manual_seed(5)
    N, K, V = 6, 4, 9
    tp = torch.softmax(torch.randn(N, K + 1, V, generator=g) * 2, -1)
    arg = tp.argmax(-1)
    drafts = arg[:, :K].clone()
    drafts[1, 2] = (drafts[1, 2] + 1) % V  # greedy row 1 rejects at position 2
    nd = torch.tensor([4, 4, 0, 2, 3, 1])
    greedy = torch.tensor([True, True, True, False, False, False])
    res = rejection_sample(tp, drafts, nd, greedy=greedy, generators=[torch.Generator().manual_seed(i) for i in range(N)])
    assert res.num_accepted[:3].tolist() == [4, 2, 0]
    assert res.tokens[0].tolist() == arg[0].tolist()
    assert res.tokens[1].tolist() == arg[1, :3].tolist() + [-1, -1]
    assert res.tokens[2].tolist() == [int(arg[2, 0])] + [-1] * 4
    for i in range(N):
        n = int(res.num_accepted[i])
        assert n <= int(nd[i])
        assert (res.tokens[i, n + 1:] == -1).all() and (res.tokens[i, : n + 1] >= 0).all()


def test_generator_seeds_reproduce_independent_of_batch():
    g = torch.Generator().manual_seed(9)
    N, K, V = 5, 3, 11
    tp = torch.softmax(torch.randn(N, K + 1, V, generator=g), -1)
    dp = torch.softmax(torch.randn(N, K, V, generator=g), -1)
    drafts = torch.randint(V, (N, K), generator=g)
    nd = torch.tensor([3, 2, 3, 0, 1])

    def run(rows, k_pad):
        gens = [torch.Generator().manual_seed(1000 + r) for r in rows]
        pad = k_pad - K
        t = torch.nn.functional.pad(tp[rows], (0, 0, 0, pad), value=1.0 / V)
        q = torch.nn.functional.pad(dp[rows], (0, 0, 0, pad), value=1.0 / V)
        d = torch.nn.functional.pad(drafts[rows], (0, pad), value=-1)
        return rejection_sample(t, d, nd[rows], draft_probs=q, generators=gens)

    full = run(list(range(N)), K)
    again = run(list(range(N)), K)
    assert torch.equal(full.tokens, again.tokens)
    alone = run([2], K + 2)  # different batch and different padding
    assert alone.tokens[0, : K + 1].tolist() == full.tokens[2].tolist()
    sub = run([4, 0], K)
    assert torch.equal(sub.tokens[1], full.tokens[0]) and torch.equal(sub.tokens[0], full.tokens[4])


def test_counter_noise_is_batch_and_padding_invariant():
    seeds = torch.tensor([1, 2, 3])
    pos = torch.tensor([[0, 1, 2], [5, 6, 7], [9, 10, 11]])
    a = counter_noise(seeds, pos, 16)
    b = counter_noise(seeds[1:2], torch.tensor([[5, 6, 7, 8, 9]]), 16)
    assert torch.equal(a.exp[1], b.exp[0, :3]) and torch.equal(a.uniform[1], b.uniform[0, :2])
    assert not torch.equal(a.exp[0], a.exp[1])
    u = torch.exp(-counter_noise(torch.arange(64), torch.zeros(64, 2, dtype=torch.long), 4096).exp)
    assert abs(float(u.mean()) - 0.5) < 0.005 and float(u.min()) > 0 and float(u.max()) < 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(1)
    N, K, V = 64, 4, 1000
    tp = torch.softmax(torch.randn(N, K + 1, V, generator=g), -1)
    dp = torch.softmax(torch.randn(N, K, V, generator=g), -1)
    drafts = torch.randint(V, (N, K), generator=g)
    nd = torch.randint(K + 1, (N,), generator=g)
    seeds, pos = torch.arange(N), torch.arange(K + 1).repeat(N, 1)
    for q in (None, dp):
        cpu = rejection_sample(tp, drafts, nd, draft_probs=q, noise=counter_noise(seeds, pos, V))
        gpu = rejection_sample(tp.cuda(), drafts.cuda(), nd.cuda(), draft_probs=None if q is None else q.cuda(),
                               noise=counter_noise(seeds.cuda(), pos.cuda(), V))
        assert torch.equal(cpu.tokens, gpu.tokens.cpu()) and torch.equal(cpu.num_accepted, gpu.num_accepted.cpu())
    noise = generator_noise([torch.Generator("cuda").manual_seed(3)] * 2, torch.tensor([2, 1]), 3, 50, "cuda")
    assert noise.exp.is_cuda
