"""n-gram and suffix proposers, and the adaptive speculation controller."""
from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.spec.adaptive import SpecController, StepCostModel, StepCostTable
from engine.spec.ngram import NgramProposer, ngram_propose_reference
from engine.spec.proposer import Proposer
from engine.spec.suffix import SuffixProposer

DOC = list(range(100, 160))  # distinct tokens: a "document" to copy from


def test_protocol():
    assert isinstance(NgramProposer(), Proposer) and isinstance(SuffixProposer(), Proposer)
    assert NgramProposer.is_deterministic and SuffixProposer.is_deterministic


# -- n-gram ---------------------------------------------------------------------------------
def test_ngram_copies_continuation():
    p = NgramProposer(min_n=1, max_n=4)
    hist = [1, 2] + DOC + [7, 8] + DOC[:10]
    assert p.propose(["a"], [hist], [5]) == [DOC[10:15]]
    assert p.propose(["a"], [hist + DOC[10:12]], [3]) == [DOC[12:15]]  # incremental
    assert p.propose(["a"], [hist], [0]) == [[]]  # rewritten (shorter) history rebuilds


def test_ngram_no_match_and_min_n():
    p = NgramProposer(min_n=2, max_n=3)
    assert p.propose(["a"], [[1, 2, 3, 4, 5]], [4]) == [[]]
    assert p.propose(["b"], [[1, 2, 3, 9, 3]], [4]) == [[]]  # only a unigram repeats
    assert NgramProposer(1, 3).propose(["c"], [[1, 2, 3, 9, 3]], [2]) == [[9, 3]]
    assert p.propose(["d"], [[]], [3]) == [[]]


def test_ngram_prefers_longest_then_latest():
    p = NgramProposer(min_n=1, max_n=3)
    hist = [5, 6, 7, 1, 6, 7, 2, 9, 7]
    # "7" occurs at 2 and 5: latest earlier is 5 -> follows with 2
    assert p.propose(["a"], [hist], [2]) == [[2, 9]]
    hist2 = [5, 6, 7, 1, 0, 6, 7, 2, 5, 6, 7]
    # 3-gram [5,6,7] matches at 0 (-> 1) and beats the later 2-gram [6,7] at 5 (-> 2)
    assert p.propose(["b"], [hist2], [1]) == [[1]]


def test_ngram_periodic_extends_into_draft():
    p = NgramProposer(1, 2)
    assert p.propose(["a"], [[3, 4, 3, 4, 3]], [5]) == [[4, 3, 4, 3, 4]]


@settings(max_examples=200, deadline=None)
@given(
    toks=st.lists(st.integers(0, 4), min_size=0, max_size=80),
    cuts=st.lists(st.integers(0, 80), max_size=8),
    k=st.integers(0, 6),
    ns=st.tuples(st.integers(1, 3), st.integers(0, 3)),
)
def test_ngram_incremental_equals_reference(toks, cuts, k, ns):
    min_n, max_n = ns[0], ns[0] + ns[1]
    p = NgramProposer(min_n, max_n)
    for c in sorted(set(cuts)) + [len(toks)]:
        h = toks[: min(c, len(toks))]
        assert p.propose(["r"], [h], [k]) == [ngram_propose_reference(h, k, min_n, max_n)]


@given(toks=st.lists(st.integers(0, 3), min_size=0, max_size=60), step=st.integers(1, 3),
       ns=st.tuples(st.integers(1, 3), st.integers(0, 3)))
def test_ngram_token_by_token_equals_reference(toks, step, ns):
    """Decoding appends one token per step (two or three after accepted drafts): the index's
    fast path for small appends must agree with the definition at every length."""
    min_n, max_n = ns[0], ns[0] + ns[1]
    p = NgramProposer(min_n, max_n)
    for c in range(0, len(toks) + 1, step):
        h = toks[:c]
        assert p.propose(["r"], [h], [3]) == [ngram_propose_reference(h, 3, min_n, max_n)]


def test_ngram_long_appends_equal_reference():
    """Prompts and catch-ups of hundreds of tokens compute their keys with numpy: the same
    proposals as the definition, before and after small steps."""
    import random
    rng = random.Random(5)
    toks = [rng.randrange(6) for _ in range(900)]
    for min_n, max_n in ((1, 4), (2, 4), (3, 5)):
        p = NgramProposer(min_n, max_n)
        for c in (300, 302, 303, 700, 701, 900):
            h = toks[:c]
            assert p.propose(["r"], [h], [5]) == [ngram_propose_reference(h, 5, min_n, max_n)]


@given(toks=st.lists(st.integers(0, 4), min_size=0, max_size=120), ns=st.tuples(st.integers(1, 3), st.integers(0, 3)))
def test_ngram_first_look_search_equals_reference_and_builds_the_tables_next(toks, ns):
    """A request's first proposal searches with numpy (no tables); the second builds the tables.
    Both answer as the definition does."""
    min_n, max_n = ns[0], ns[0] + ns[1]
    p = NgramProposer(min_n, max_n)
    assert p.propose(["r"], [toks], [4]) == [ngram_propose_reference(toks, 4, min_n, max_n)]
    idx = p._index["r"]
    assert not any(idx.tables) and not idx.lazy
    h = toks + [1]
    assert p.propose(["r"], [h], [4]) == [ngram_propose_reference(h, 4, min_n, max_n)]
    assert any(idx.tables) or len(h) <= min_n


def test_ngram_step_cost_is_incremental():
    p = NgramProposer(1, 4)
    hist = [i % 5000 for i in range(50_000)]
    p.propose(["a"], [hist], [4])
    t0 = time.perf_counter()
    for i in range(2000):
        hist.append(i % 5000)
        p.propose(["a"], [hist], [4])
    # O(history) per step would be >= 2000 * 50k ops; the index does ~10 dict ops per step
    assert time.perf_counter() - t0 < 1.0


# -- suffix ---------------------------------------------------------------------------------
def test_suffix_copies_from_own_prompt():
    p = SuffixProposer()
    hist = [1, 2] + DOC + [7, 8] + DOC[:10]
    assert p.propose(["a"], [hist], [6]) == [DOC[10:16]]
    assert p.propose(["b"], [[1, 2, 3, 4, 5, 6]], [4]) == [[]]


def test_suffix_stops_when_continuation_is_uncertain():
    p = SuffixProposer(min_prob=0.3)
    # after "5 6 7" the history continued 4 different ways: no single token reaches 0.3
    hist = [5, 6, 7, 1, 5, 6, 7, 2, 5, 6, 7, 3, 5, 6, 7, 4, 5, 6, 7]
    assert p.propose(["a"], [hist], [3]) == [[]]
    # two agreeing continuations out of three: proposes the majority (p = 2/3)
    hist = [5, 6, 7, 1, 5, 6, 7, 2, 8, 5, 6, 7, 2, 8, 5, 6, 7]
    assert p.propose(["b"], [hist], [2]) == [[2, 8]]


@settings(max_examples=150, deadline=None)
@given(
    toks=st.lists(st.integers(0, 3), min_size=0, max_size=120),
    cuts=st.lists(st.integers(0, 120), max_size=6),
    k=st.integers(1, 6),
)
def test_suffix_incremental_equals_from_scratch(toks, cuts, k):
    inc = SuffixProposer(max_depth=8, max_occurrences=4)
    for c in sorted(set(cuts)) + [len(toks)]:
        h = toks[: min(c, len(toks))]
        fresh = SuffixProposer(max_depth=8, max_occurrences=4)
        assert inc.propose_drafts(["r"], [h], [k]) == fresh.propose_drafts(["r"], [h], [k])


def _match_definition(idx, context, k, min_prob, spec_factor, self_overlap):
    """SuffixIndex.match written plainly: the longest indexed suffix of the context, then per
    position the most frequent next token over the live occurrences."""
    from engine.spec.suffix_index import SEP, Draft, gram_key
    occ, n_match = None, 0
    for n in reversed(idx.lengths):
        if n <= len(context) and (occ := idx.tables[n].get(gram_key(context[len(context) - n:]))) is not None:
            n_match = n
            break
    if occ is None or k <= 0:
        return Draft()
    occ = [occ] if isinstance(occ, int) else occ

    def at(pos, draft):
        i = pos
        if i < len(idx.tokens):
            return None if idx.tokens[i] == SEP else idx.tokens[i]
        d = i - len(idx.tokens)
        return draft[d] if self_overlap and d < len(draft) else None

    k = min(k, max(1, int(spec_factor * n_match)))
    alive, draft, probs, cum = occ[-idx.max_occ:], [], [], 1.0
    for i in range(k):
        counts = {}
        for e in alive:
            tok = at(e + 1 + i, draft)
            if tok is not None:
                counts[tok] = counts.get(tok, 0) + 1
        if not counts:
            break
        tok, c = max(counts.items(), key=lambda kv: kv[1])
        p = c / len(alive)
        cum *= p
        if cum < min_prob:
            break
        alive = [e for e in alive if at(e + 1 + i, draft) == tok]
        draft.append(tok)
        probs.append(p)
    return Draft(draft, probs, n_match)


@settings(max_examples=200, deadline=None)
@given(toks=st.lists(st.integers(0, 3), min_size=1, max_size=100), ctx_len=st.integers(1, 12),
       k=st.integers(0, 6), min_prob=st.sampled_from([0.0, 0.1, 0.5]), overlap=st.booleans(),
       seps=st.lists(st.integers(0, 99), max_size=3))
def test_suffix_match_equals_its_definition(toks, ctx_len, k, min_prob, overlap, seps):
    from engine.spec.suffix_index import SEP, SuffixIndex
    stream = list(toks)
    for s in seps:  # job indexes hold several outputs separated by SEP
        if s < len(stream):
            stream[s] = SEP
    idx = SuffixIndex(max_depth=8, max_occurrences=4)
    idx.append(stream, index_last=True)
    ctx = [x for x in toks[-ctx_len:]]
    assert idx.match(ctx, k, min_prob, 1.0, overlap) == _match_definition(idx, ctx, k, min_prob, 1.0, overlap)


def _json_output(i: int) -> list[int]:
    # a template {"name": <v>, "age": <v>, "city": <v>} with per-request values
    return [900, 901, 902, 1000 + i, 903, 904, 905, 911, 2000 + i, 903, 906, 907, 912, 3000 + i, 908]


def test_job_tree_learns_output_structure():
    p = SuffixProposer()
    prompt = list(range(40, 70))  # unrelated to the template: the request tree cannot help
    assert p.propose(["new"], [prompt + [900]], [3], job_ids=["job"]) == [[]]
    for i in range(5):
        p.on_finished(f"r{i}", _json_output(i), job_id="job")
    # mid-output: right after a novel value nothing matches; once the next field starts,
    # the job tree proposes the rest of it (draft length capped by the match length)
    ctx = prompt + _json_output(99)[:4]
    assert p.propose(["new"], [ctx], [3], job_ids=["job"]) == [[]]
    ctx = prompt + _json_output(99)[:6]
    assert p.propose(["new"], [ctx], [3], job_ids=["job"]) == [[905, 911]]
    assert p.propose(["new"], [prompt + [900, 901]], [1], job_ids=["job"]) == [[902]]
    # after more output, a longer match lets it run further (values differ: it stops there)
    ctx = prompt + _json_output(99)[:8] + [2099, 903, 906]
    assert p.propose(["new"], [ctx], [3], job_ids=["job"]) == [[907, 912]]
    # other jobs do not see it
    assert p.propose(["x"], [ctx], [3], job_ids=["other"]) == [[]]
    # the request's state is freed
    p.on_finished("new", [], job_id="job")
    assert "new" not in p._req


def test_job_tree_memory_is_bounded():
    p = SuffixProposer(max_job_tokens=500, max_jobs=2)
    for i in range(300):
        p.on_finished(f"r{i}", _json_output(i), job_id="job")
    job = p._jobs["job"]
    assert job.size <= 500 and sum(len(x) for x in job.indexes) <= 500
    # the 2nd token after "900 901 902" is a per-request value: too uncertain to propose
    assert p.propose(["n"], [[900, 901]], [2], job_ids=["job"]) == [[902]]
    for j in range(3):
        p.on_finished("z", [1, 2, 3], job_id=f"j{j}")
    assert len(p._jobs) == 2 and "job" not in p._jobs


# -- adaptive controller --------------------------------------------------------------------
def _train(c: SpecController, rid: str, a: float, steps: int = 30, k: int = 5) -> None:
    acc_total = 0.0
    for _ in range(steps):  # deterministic stream with per-token acceptance ~ a
        acc = 0
        while acc < k:
            acc_total += a
            if acc_total >= 1:
                acc_total -= 1
                acc += 1
            else:
                break
        c.record(rid, k, acc, job_id="j")


def test_controller_speculates_at_batch1_high_acceptance():
    c = SpecController(max_k=5)
    _train(c, "a", 0.9)
    assert c.acceptance("a") > 0.8
    assert c.choose_k(["a"]) == [5]
    assert c.choose_k(["a"], max_k=[2]) == [2]


def test_controller_off_at_large_batch_low_acceptance():
    c = SpecController(max_k=5)
    rids = [f"r{i}" for i in range(256)]
    for r in rids:
        _train(c, r, 0.2)
    assert c.choose_k(rids) == [0] * 256


def test_controller_mixed_batch_prefers_confident_requests():
    # (Allocation only: with the sync charge, 8 drafting rows of 48 do not pay for stalling all.)
    c = SpecController(max_k=4, step_cost=StepCostModel(knee_tokens=64), sync_factor=0.0)
    rids = [f"r{i}" for i in range(48)]
    for i, r in enumerate(rids):
        _train(c, r, 0.95 if i < 8 else 0.1)
    k = c.choose_k(rids)
    assert all(x > 0 for x in k[:8]) and sum(k[8:]) <= sum(k[:8])


def _allocate_by_definition(c: SpecController, acc: list[float], caps: list[int], disc: list[float] | None):
    """The allocation as the controller's docstring defines it: every draft's marginal gain,
    best first (ties to the earlier request), and the count with the most tokens per unit cost
    over every count, none where plain decoding is not beaten by min_gain."""
    B = len(acc)
    gains = []
    for i, a in enumerate(acc):
        g = disc[i] if disc else 1.0
        for _ in range(caps[i]):
            g *= a
            gains.append((g, i))
    gains.sort(key=lambda t: -t[0])
    cost, base = c.step_cost, B / c.step_cost(B)
    sync = c.sync_cost(B) * c.step_cost(B)
    rates = [sum(g for g, _ in gains[:m]) + B for m in range(len(gains) + 1)]
    rates = [t / (cost(B + m) + (sync if m else 0.0)) for m, t in enumerate(rates)]
    best = max(range(1, len(rates)), key=lambda m: (rates[m], -m), default=0)
    k = [0] * B
    if best and rates[best] > base and rates[best] >= base * c.min_gain:
        for _, i in gains[:best]:
            k[i] += 1
    return k


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 0.99), st.integers(0, 5), st.floats(0.05, 1.0)), min_size=1, max_size=40),
       st.sampled_from([None, 0.0, 0.5, 2.0]), st.sampled_from([16, 64, 256]), st.booleans(), st.booleans())
def test_controller_allocation_equals_its_definition(reqs, sync, knee, use_disc, table):
    """The scan over draft counts stops at the first fall in tokens per cost (the cost is convex
    and the gains fall); a measured table, not convex in general, is scanned whole."""
    cost = StepCostTable([(1, 1.0), (24, 1.05), (40, 1.6), (200, 2.0)]) if table else StepCostModel(knee_tokens=knee)
    c = SpecController(max_k=5, step_cost=cost, sync_factor=sync if sync is not None else 0.5)
    acc = [round(a, 3) for a, _, _ in reqs]
    caps = [k for _, k, _ in reqs]
    disc = [round(d, 3) for *_, d in reqs] if use_disc else None
    assert c._allocate(acc, caps, disc) == _allocate_by_definition(c, acc, caps, disc)
    uniform = acc[0]
    assert c.can_pay(len(acc), uniform) == any(_allocate_by_definition(c, [min(0.99, round(uniform + 0.005, 2))] * len(acc),
                                                                       [5] * len(acc), None))


def test_controller_measured_table_and_stats():
    flat = StepCostTable([(1, 0.010), (512, 0.011)])
    steep = StepCostTable([(1, 0.010), (8, 0.080)])  # pretend every token costs a full step
    c1, c2 = SpecController(step_cost=flat), SpecController(step_cost=steep)
    for c in (c1, c2):
        _train(c, "a", 0.6)
    assert c1.choose_k(["a"])[0] > 0 and c2.choose_k(["a"]) == [0]
    s = c1.job_stats["j"]
    assert s.proposed == 150 and 0 < s.acceptance_rate < 1
    assert s.mean_accepted_length == (s.accepted + s.steps) / s.steps
    c1.record("b", 0, 0)
    assert c1.stats.steps == 30  # k = 0 steps carry no evidence


def _trained(c: SpecController, prefix: str, n: int, a: float) -> list[str]:
    """n request ids whose recorded acceptance is about a."""
    ids = [f"{prefix}{i}" for i in range(n)]
    for r in ids:
        _train(c, r, a)
    return ids


def test_controller_charges_the_lost_overlap_of_a_drafting_step():
    """Drafting makes a step synchronous. At batch 32 (flat cost) low acceptance no longer pays
    for that; high acceptance still does, and so does batch 1 when copying."""
    c = SpecController(max_k=4)
    low, high = _trained(c, "l", 32, 0.2), _trained(c, "h", 32, 0.9)
    assert c.choose_k(low) == [0] * 32
    assert all(k > 0 for k in c.choose_k(high))
    assert c.choose_k(["h0"]) == [4]
    free = SpecController(max_k=4, sync_factor=0.0)
    assert sum(free.choose_k(_trained(free, "l", 32, 0.2))) > 0  # what the controller did before the term


def test_controller_learns_what_a_drafting_step_really_costs():
    """On a host-bound model a drafting step at batch 32 takes 3.3 plain steps (the host work
    runs serialised with the GPU). The learned overhead makes JSON-like acceptance (0.6) stop
    drafting there, while near-certain copying still drafts. At batch 1, where a drafting
    step costs 1.3 plain steps, 0.6 keeps drafting."""
    c = SpecController(max_k=4)
    mid, sure = _trained(c, "m", 32, 0.6), _trained(c, "s", 32, 0.97)
    assert sum(c.choose_k(mid)) > 0  # the fixed half-step charge alone lets 0.6 draft
    for _ in range(12):
        for _ in range(5):
            c.observe_step(32, 32, drafted=False, overlapped=True, seconds=0.001)
        c.observe_step(32, 160, drafted=True, overlapped=False, seconds=0.0033)
        c.observe_step(32, 32, drafted=False, overlapped=False, seconds=0.0015)
    assert 1.8 < c.sync_cost(32) < 2.5
    learned = c.sync_cost(32)
    c.observe_step(32, 160, drafted=True, overlapped=False, seconds=0.05, decode_only=False)  # + a prefill
    c.observe_step(32, 32, drafted=False, overlapped=True, seconds=0.04, decode_only=False)
    assert c.sync_cost(32) == learned and c._plain_s[c.bucket(32)] < 0.0011
    assert c.choose_k(mid) == [0] * 32
    assert all(k > 0 for k in c.choose_k(sure))
    for _ in range(12):
        c.observe_step(1, 1, drafted=False, overlapped=True, seconds=0.001)
        c.observe_step(1, 5, drafted=True, overlapped=False, seconds=0.0013)
        c.observe_step(1, 5, drafted=True, overlapped=False, seconds=0.0013)
    assert c.sync_cost(1) < 0.5
    assert c.choose_k(["m0"])[0] > 0


def test_controller_probes_a_request_again_after_it_was_switched_off():
    c = SpecController(max_k=4)
    rids = [f"r{i}" for i in range(32)]
    for r in rids:
        _train(c, r, 0.1)
    ks = [c.choose_k(rids) for _ in range(200)]
    first = next(i for i, k in enumerate(ks) if sum(k) > 0)
    assert ks[0] == [0] * 32 and 5 < first < 200


def test_new_requests_start_from_recent_acceptance():
    """A batch job's requests do the same task: after requests that copied well, a new request
    starts with high expected acceptance (and drafts at once); after open chat, low."""
    c = SpecController(max_k=4)
    assert c.acceptance("new") == c.prior
    for i in range(20):
        _train(c, f"copy{i}", 0.95)
    assert c.acceptance("new") > 0.85
    for i in range(60):
        _train(c, f"chat{i}", 0.1)
    assert c.acceptance("new") < 0.3


def test_a_learned_drafting_overhead_fades_back_when_nothing_drafts():
    """A slow spell can price drafting out; with no drafting steps the overhead would never be
    learned again. Plain steps fade it back toward the prior, so copying drafts again."""
    c = SpecController(max_k=4)
    sure = _trained(c, "s", 1, 0.9)
    c.observe_step(1, 1, drafted=False, overlapped=True, seconds=0.001)
    for _ in range(10):
        c.observe_step(1, 5, drafted=True, overlapped=False, seconds=0.006)  # a host stall
    assert c.sync_cost(1) > 3.5 and c.choose_k(sure) == [0]
    for _ in range(300):  # 300 plain steps: under half a second of a batch-1 job
        c.observe_step(1, 1, drafted=False, overlapped=True, seconds=0.001)
    assert c.sync_cost(1) < 1.0 and c.choose_k(sure)[0] > 0


def test_controller_acceptances_equal_acceptance_per_request():
    c = SpecController()
    ids = [f"r{i}" for i in range(40)]
    for j, rid in enumerate(ids[:30]):
        for _ in range(j % 5):
            c.record(rid, 4, j % 4)
    c.record_guess("r35", True)
    assert c.acceptances(ids) == [c.acceptance(rid) for rid in ids]
    assert len(set(c.acceptances(ids))) > 3  # new, idle and trained requests alike


def test_controller_numpy_allocation_equals_the_python_loop():
    """Past `numpy_from` drafts the controller allocates with numpy: the same k per request as
    the Python sort and scan, for any acceptance, caps, discounts, threshold and overhead."""
    import random
    rng = random.Random(0)
    for _ in range(600):
        c = SpecController(max_k=rng.choice([4, 8]), min_gain=rng.choice([1.0, 1.02, 1.1]),
                           sync_factor=rng.choice([0.0, 0.5, 2.0]))
        B = rng.choice([1, 3, 20, 40, 100, 200, 256])
        acc = [rng.choice([0.5, rng.uniform(0, 0.99), 0.9]) for _ in range(B)]
        caps = [rng.randrange(0, c.max_k + 1) for _ in range(B)]
        disc = [rng.uniform(0.2, 1) for _ in range(B)] if rng.random() < 0.5 else None
        c.numpy_from = 10 ** 9
        py = c._allocate(acc, caps, disc)
        c.numpy_from = 0
        assert c._allocate(acc, caps, disc) == py


def test_controller_can_pay_with_numpy_equals_the_python_scan():
    import random
    rng = random.Random(1)
    for _ in range(400):
        c = SpecController(max_k=rng.choice([4, 8]), min_gain=rng.choice([1.0, 1.02, 1.1]),
                           sync_factor=rng.choice([0.0, 0.5, 2.0]))
        B, a = rng.choice([1, 8, 20, 32, 64, 100, 200, 256]), rng.uniform(0, 0.99)
        c.numpy_from = 10 ** 9
        py = c.can_pay(B, a)
        c._can_pay.clear()
        c.numpy_from = 0
        assert c.can_pay(B, a) == py


def test_can_pay_past_64_never_rejects_what_the_exact_batch_could_pay():
    """Past 64 requests the check answers for the batch rounded down to a multiple of 8: never
    stricter than the exact batch (a smaller batch pays at least as easily), and the same answer
    below 64."""
    import random
    rng = random.Random(3)
    for _ in range(60):
        c = SpecController(max_k=8, sync_factor=rng.choice([0.0, 0.3, 0.5, 2.0]), min_gain=rng.choice([1.02, 1.1]))
        a = rng.uniform(0.05, 0.99)
        per = [a ** j for j in range(1, 9)]
        for B in range(1, 300, 7):
            exact = c._best_count([g for g in per for _ in range(B)], B) > 0
            got = c.can_pay(B, a - 0.005)  # (can_pay rounds the acceptance up to 2 digits)
            assert got or not exact
            if B <= 64:
                assert got == exact or round(a, 2) > a


def test_a_full_batch_and_one_a_request_short_of_it_share_a_bucket():
    """Batches sit at max_num_seqs (commonly a power of two) or just below it as requests finish
    and are replaced: both must be judged from one set of samples. Buckets end at powers of two."""
    from engine.spec.adaptive import batch_bucket
    for top in (2, 4, 8, 16, 32, 64, 128, 256):
        assert batch_bucket(top) == batch_bucket(top - 1 if top > 2 else top) == batch_bucket(top // 2 + 1)
        assert batch_bucket(top + 1) == batch_bucket(top) + 1
    assert batch_bucket(1) != batch_bucket(2)
    c = SpecController(max_k=8)
    c._sync[batch_bucket(32)] = 3.0  # learned at 32: prices 17-32, and a batch of 129 is not 128's
    assert c.sync_cost(30) == 3.0 and c.sync_cost(33) == c.sync_factor
    c.can_pay(129)
    assert all(key[0] >= 129 for key in c._can_pay)
