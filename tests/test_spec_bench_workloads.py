"""`prefixq bench spec` workloads: what makes its figures fair."""
from __future__ import annotations

import random

from bench.spec import workloads


def test_every_prompt_of_a_workload_is_distinct():
    """A timed run is one job, and the suffix proposer's job-wide index would copy a repeated
    prompt's greedy answer whole: no workload may repeat a prompt, even at batch 256."""
    wl = workloads(300, random.Random(0))
    for name, msgs in wl.items():
        texts = [m[0]["content"] for m in msgs]
        assert len(set(texts)) == len(texts), name


def test_the_proposer_ceiling_walks_outputs_as_verification_would():
    """An output that copies its prompt is drafted k tokens at a time (k + 1 per step, the last
    step shorter); one that copies nothing gets one token per step; the job index lets a later
    request copy an earlier request's output."""
    from bench.proposer_ceiling import ceiling
    from engine.spec import NgramProposer, SuffixProposer
    rng = random.Random(1)
    doc = [rng.randrange(1000, 2000) for _ in range(40)]
    copy = [(doc, doc[:3] + doc[3:35])]  # the output repeats the prompt from its start
    c = ceiling(lambda: NgramProposer(2, 4), copy, k=4, job=None)
    assert c["tokens"] == 35 and c["acceptance"] == 1.0
    assert c["steps"] <= 3 + -(-32 // 5) + 1  # a few steps to find a match, then k + 1 per step
    fresh = [(doc, [rng.randrange(5000, 9000) for _ in range(30)])]
    assert ceiling(lambda: NgramProposer(2, 4), fresh, k=4, job=None)["tokens_per_step"] == 1.0
    shared = [rng.randrange(3000, 4000) for _ in range(30)]
    pair = [([1, 2, 3], shared), ([4, 5, 6], shared)]
    with_job = ceiling(SuffixProposer, pair, k=4, job="j")
    without = ceiling(SuffixProposer, pair, k=4, job=None)
    assert with_job["steps"] < without["steps"] == 60


def test_paired_speedup_cancels_a_slow_phase_that_covers_a_round():
    """Round 2 ran while the host was slow for both modes: best-of-runs would pair the off run of a
    fast round with whichever run of the method was fastest; the paired median reads each round
    against itself."""
    from bench.spec import _paired
    off = [100.0, 60.0, 100.0]
    method = [90.0, 54.0, 91.0]
    assert abs(_paired(method, off) - 0.9) < 1e-9
    assert _paired([120.0, 50.0, 80.0], [100.0, 100.0, 100.0]) == 0.8
