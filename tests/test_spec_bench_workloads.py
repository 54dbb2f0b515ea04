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
