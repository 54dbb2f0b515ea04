"""Speculative decoding inside the engine: exact for greedy and for seeded sampling,
and no KV block leaks."""
from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from tests.engine_helpers import mixed_prompts
from tests.test_engine_correctness import run_engine, tiny_engine


def copy_heavy_prompts(n: int) -> list[list[int]]:
    # Repeated segments give the n-gram and suffix proposers something to copy.
    segs = mixed_prompts(n, 256, 6, 12, seed=21)
    return [s * 4 + s[:3] for s in segs]


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_greedy_speculation_is_exact(method):
    prompts = copy_heavy_prompts(12)
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = run_engine(tiny_engine("llama"), prompts, sp)
    eng = tiny_engine("llama", speculative_method=method, num_speculative_tokens=4, adaptive_speculation=False)
    spec = run_engine(eng, prompts, sp)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    s = eng.stats()
    assert s["spec_proposed"] > 0 and s["spec_accepted"] > 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_seeded_sampling_unchanged_by_speculation():
    prompts = copy_heavy_prompts(6)
    params = [SamplingParams(max_tokens=20, temperature=0.8, top_k=20, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts))]
    plain = run_engine(tiny_engine("qwen3"), prompts, params)
    eng = tiny_engine("qwen3", speculative_method="ngram", num_speculative_tokens=3, adaptive_speculation=False,
                      prompt_lookup_min=1)
    spec = run_engine(eng, prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert eng.stats()["spec_proposed"] > 0


def test_adaptive_speculation_backs_off_at_large_batch():
    prompts = mixed_prompts(48, 256, 5, 20, seed=4)
    eng = tiny_engine("llama", speculative_method="ngram", num_speculative_tokens=4, max_num_seqs=48)
    run_engine(eng, prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    # Random prompts rarely match: the controller stops proposing once acceptance is seen to be low.
    s = eng.stats()
    assert s["spec_proposed"] < 48 * 5 * 4 / 2


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_draft_model_speculation_is_exact_and_accepts_its_own_tokens(overlap):
    """With async output (the GPU default) the draft engine also runs its steps overlapped, each
    draft token reaching the next step on the device; the drafts must be the same."""
    from tests.engine_helpers import tiny_model_dir
    prompts = copy_heavy_prompts(6)
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = run_engine(tiny_engine("llama"), prompts, sp)
    # The target as its own draft: every greedy draft must be accepted.
    eng = tiny_engine("llama", speculative_model=tiny_model_dir("llama"), num_speculative_tokens=3,
                      adaptive_speculation=False, async_scheduling=overlap)
    assert eng.spec.proposer.engine.async_output == overlap
    spec = run_engine(eng, prompts, sp)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    s = eng.stats()
    assert s["spec_proposed"] > 0 and s["spec_accepted"] == s["spec_proposed"]
    draft = eng.spec.proposer.engine
    assert not draft.requests and draft.block_manager.num_free_blocks == draft.block_manager.num_blocks


def test_governor_follows_measured_rates_and_rechecks_less_and_less():
    from engine.spec_decode import SpecGovernor
    g = SpecGovernor(explore_every=10, explore_steps=2, warm=1)
    assert g.speculate(32) is True  # unmeasured: try speculation first
    g.observe(32, True, tokens=100, seconds=1.0)
    assert g.speculate(32) is False  # then plain
    g.observe(32, False, tokens=300, seconds=1.0)
    picks = []
    for _ in range(100):  # as in the engine, each step is timed for the mode it ran in
        p = g.speculate(32)
        picks.append(p)
        g.observe(32, p, tokens=100 if p else 300, seconds=1.0)
    checks = [i for i, p in enumerate(picks) if p]
    # Plain wins; speculation is re-checked for 2 steps, each time after twice as long a wait,
    # measured afresh each time (its old samples are dropped when a re-check starts).
    assert checks == [9, 10, 31, 32, 73, 74]
    assert len(g.samples[(g.bucket(32), True)]) == 2
    g.observe(1, True, tokens=500, seconds=1.0)
    g.observe(1, False, tokens=100, seconds=1.0)
    assert [g.speculate(1) for _ in range(10)].count(True) >= 8  # where speculation wins, it runs


def test_governor_measures_both_modes_a_few_times_and_shrugs_off_an_outlier():
    from engine.spec_decode import SpecGovernor
    g = SpecGovernor(warm=3)
    modes = []
    for _ in range(6):  # alternates until each mode has 3 steps
        m = g.speculate(1)
        modes.append(m)
        # speculation emits 3 tokens per 2 ms, plain 1 per 1 ms; the first speculating step
        # pays a one-off 100 ms (an index build)
        secs = 0.1 if m and not any(modes[:-1]) else (0.002 if m else 0.001)
        g.observe(1, m, 3 if m else 1, secs)
    assert modes == [True, False, True, False, True, False]
    assert [g.speculate(1) for _ in range(20)].count(True) >= 18  # the outlier did not lock it out


def test_verification_rows_run_as_decode_and_match_the_extend_path(monkeypatch):
    """A verifying step gives each scored token its own decode row (so the GPU replays a decode
    CUDA graph); its logits must equal those of the extend-attention path."""
    import torch

    import engine.model_runner as mr
    prompts = copy_heavy_prompts(6)
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)

    def run(max_rows):
        monkeypatch.setattr(mr, "MAX_ROWS_AS_DECODE", max_rows)
        eng = tiny_engine("llama-gqa3-tied", speculative_method="ngram", num_speculative_tokens=4,
                          adaptive_speculation=False)
        seen = []
        fwd = eng.runner.forward

        def spy(inp):
            out = fwd(inp)
            if any(n > 1 for n in inp.rows_per_req):
                seen.append((inp.meta.is_decode, out.clone()))
            return out
        eng.runner.forward = spy
        return run_engine(eng, prompts, sp), seen

    outs_decode, seen_decode = run(8)
    outs_extend, seen_extend = run(0)
    assert [o.token_ids for o in outs_decode] == [o.token_ids for o in outs_extend]
    assert seen_decode and all(d for d, _ in seen_decode) and not any(d for d, _ in seen_extend)
    assert len(seen_decode) == len(seen_extend)
    for (_, a), (_, b) in zip(seen_decode, seen_extend):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_decode_graphs_cover_every_verification_row():
    """With speculation a step of b requests verifying k drafts each runs b * (k + 1) decode
    rows; graphs sized for b alone sent those steps down the eager path (14 ms a step at batch
    8 on SmolLM2, against about 4 ms through a graph)."""
    from engine.model_runner import MAX_ROWS_AS_DECODE, decode_graph_sizes
    assert decode_graph_sizes(1) == [1] and decode_graph_sizes(1, 4) == [1, 2, 4, 5]
    assert max(decode_graph_sizes(32, 4)) == 256 == max(decode_graph_sizes(8, 4))  # admissions' floor
    assert max(decode_graph_sizes(32, 8)) == 288
    assert max(decode_graph_sizes(256, 4)) == 512 == max(decode_graph_sizes(4096))
    assert max(decode_graph_sizes(20, 20)) == 20 * MAX_ROWS_AS_DECODE  # longer drafts verify as extend rows
    sizes = decode_graph_sizes(100, 3)
    assert sizes == sorted(set(sizes)) and sizes[-1] == 400 and all(s % 16 == 0 for s in sizes if s > 8)


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_speculation_with_overlapped_steps_is_exact(method):
    """With async output (the GPU default, forced here on the CPU) steps where nobody drafts stay
    overlapped and drafting steps wait for the tokens in flight: output is unchanged."""
    prompts = copy_heavy_prompts(10) + mixed_prompts(6, 256, 20, 40, seed=5)
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = run_engine(tiny_engine("llama", async_scheduling=True), prompts, sp)
    eng = tiny_engine("llama", speculative_method=method, num_speculative_tokens=4, async_scheduling=True)
    # The tiny random model does not continue the copied spans, so its evidence would soon stop
    # drafts that pay for a lost overlap; this test is about exactness, so drafting is made free.
    eng.spec.controller.sync_factor = eng.spec.controller.max_sync = 0.0  # (nor learned from timing)
    eng.spec.governor = None  # and wall-clock timing on a shared CPU must not switch it off
    spec = run_engine(eng, prompts, sp)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert eng.stats()["spec_proposed"] > 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_governor_credits_steps_to_the_chosen_mode_even_when_nothing_was_drafted():
    """Open chat: the proposer rarely finds anything, yet a speculating-mode step still waits for
    the tokens in flight. The governor must time those steps as speculating ones (not as plain
    steps), or it never sees speculation's rate and keeps it on forever."""
    prompts = mixed_prompts(2, 256, 40, 60, seed=9)  # random tokens: no n-gram repeats to copy
    eng = tiny_engine("llama", speculative_method="ngram", num_speculative_tokens=4, async_scheduling=True,
                      prompt_lookup_min=3)
    gov, modes = eng.spec.governor, []
    observe = gov.observe
    gov.observe = lambda b, m, *rest: (modes.append(m), observe(b, m, *rest))
    run_engine(eng, prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert modes.count(True) >= 3 and modes.count(False) >= 3
    assert eng.stats()["spec_proposed"] == 0  # indeed nothing was drafted


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_steps_with_nothing_to_copy_stay_overlapped(method):
    """With tokens in flight, a request whose known history matches nothing does not make the
    step wait for them: open chat keeps its overlap, copy-heavy text still drafts, and the
    output is unchanged."""
    chat = mixed_prompts(3, 256, 30, 40, seed=12)  # random tokens: nothing repeats
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = run_engine(tiny_engine("llama", async_scheduling=True), chat, sp)
    eng = tiny_engine("llama", speculative_method=method, async_scheduling=True, prompt_lookup_min=2)
    eng.spec.governor = None  # speculating mode on every step, so only the lookahead decides
    steps_before = eng.counters["steps"]
    out = run_engine(eng, chat, sp)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    # A wait for the step in flight happens only for steps that then draft; the tiny model may
    # start repeating itself, so a few such steps can appear.
    waits = eng.counters["spec_wait_steps"]
    assert waits <= eng.stats()["spec_verifications"] + 1
    assert waits < (eng.counters["steps"] - steps_before) / 2
    copy = copy_heavy_prompts(4)
    eng2 = tiny_engine("llama", speculative_method=method, async_scheduling=True)
    eng2.spec.governor = None
    plain2 = run_engine(tiny_engine("llama", async_scheduling=True), copy, sp)
    assert [o.token_ids for o in run_engine(eng2, copy, sp)] == [o.token_ids for o in plain2]
    assert eng2.stats()["spec_accepted"] > 0


def test_governor_charges_occasional_costly_steps_to_their_mode():
    """Most speculating-mode steps may cost what plain ones do while every fourth waits for
    tokens in flight and verifies drafts that fail: the mode is slower overall, and a
    median of per-step rates would call it a tie."""
    from engine.spec_decode import SpecGovernor
    g = SpecGovernor(warm=3, tie_margin=0.05)
    for i in range(16):
        g.observe(32, True, 32, 0.004 if i % 4 == 3 else 0.001)
        g.observe(32, False, 32, 0.001)
    assert g.rate(32, True) < 0.9 * g.rate(32, False)
    assert [g.speculate(32) for _ in range(30)].count(True) <= 4


def _decoding(rid: str, prompt: list[int], output: list[int]):
    """A running request whose next step is a plain decode (all its tokens but the newest
    have KV)."""
    from engine.request import Request
    r = Request(rid, list(prompt), SamplingParams(max_tokens=100, temperature=0))
    r.output_token_ids = list(output)
    r.num_computed_tokens = r.num_tokens - 1
    return r


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_drafts_go_only_to_requests_whose_history_matches(method):
    """The controller plans drafts for everyone on its prior; the proposer finds something to
    copy for only 3 of 32 requests (open chat). Only those can get drafts; with most of the
    batch copying, the copying requests draft."""
    import random
    rng = random.Random(3)
    eng = tiny_engine("llama", speculative_method=method, num_speculative_tokens=4, prompt_lookup_min=2,
                      async_scheduling=True)
    eng.spec.controller.min_gain = 1.02  # (the prior must be enough to plan drafts at batch 32)
    novel = lambda: rng.sample(range(1000, 9000), 40)  # noqa: E731  (no token repeats)
    seg = [7, 8, 9, 10, 11, 12]
    copying = lambda: _decoding(f"c{rng.random()}", novel() + seg * 3, [7])  # noqa: E731
    chat = [copying() if i < 3 else _decoding(f"n{i}", novel(), [5]) for i in range(32)]
    assert sum(k for k in eng.spec.controller.choose_k([r.request_id for r in chat], [4] * 32,
                                                          forget_idle=False)) > 0  # the prior alone drafts
    eng.spec.draft_ahead(chat)
    assert not any(r.spec_token_ids for r in chat[3:])
    eng.spec.clear_drafts()
    copy = [copying() if i < 28 else _decoding(f"m{i}", novel(), [5]) for i in range(32)]
    eng.spec.draft_ahead(copy)
    drafted = [r for r in copy if r.spec_token_ids]
    assert drafted and set(drafted) <= set(copy[:28])
    assert all(r.spec_token_ids == [8, 9, 10, 11][:len(r.spec_token_ids)] for r in drafted)
    eng.spec.clear_drafts()
    assert not any(r.spec_token_ids for r in copy)


def _in_flight(rid: str, prompt: list[int], output: list[int]):
    """A running request whose newest token is still being sampled on the device."""
    from engine.llm_engine import PENDING
    r = _decoding(rid, prompt, output + [PENDING])
    r.num_pending = 1
    return r


def test_drafts_continue_the_tokens_in_flight_as_expected():
    """With a plain step in flight, drafts start after the proposer's guess at its token; with a
    drafting step in flight, after its drafts (all accepted) and the guess after them. Where the
    proposer no longer proposes a draft in flight, it expects that draft rejected and its own
    token emitted instead."""
    eng = tiny_engine("llama", speculative_method="ngram", num_speculative_tokens=3, async_scheduling=True,
                      adaptive_speculation=False)
    seg = [7, 8, 9, 10, 11, 12]
    plain = _in_flight("p", [1, 2] + seg * 3, [7])  # known: ... 7; in flight: (8)
    chained = _in_flight("c", [3, 4] + seg * 3, [7])
    chained.inflight_drafts = [8, 9]  # in flight: 8, 9 and one more (10)
    chained.num_unverified = 2
    lost = _in_flight("l", [5, 6] + seg * 3, [7])
    lost.inflight_drafts = [8, 99]  # drafts the proposer would not make now
    lost.num_unverified = 2
    eng.spec.draft_ahead([plain, chained, lost])
    assert plain.spec_assumed == [8] and plain.spec_token_ids == [9, 10, 11]
    assert chained.spec_assumed == [8, 9, 10] and chained.spec_token_ids == [11, 12, 7]
    assert lost.spec_assumed == [8, 9] and lost.spec_token_ids == [10, 11, 12]
    assert plain.spec_base == plain.num_tokens - 1  # the history they follow: all known tokens


def test_waiting_decision_skips_the_proposer_for_a_request_verifying_drafts():
    """Default drafting (wait for the step in flight): a request whose step in flight verifies
    drafts is copying, so the engine waits without a proposal on the shorter known history
    (the proposal after the wait is the one that counts). Without drafts in flight the
    decision still asks the proposer, so a batch with nothing to copy keeps its overlap."""
    eng = tiny_engine("llama", speculative_method="suffix", num_speculative_tokens=3, async_scheduling=True)
    calls = []
    real = eng.spec.proposer.propose
    eng.spec.proposer.propose = lambda *a: calls.append(1) or real(*a)
    seg = [7, 8, 9, 10, 11, 12]
    copying = _in_flight("c", [3, 4] + seg * 3, [7])
    copying.inflight_drafts = [8, 9]
    copying.num_unverified = 2
    assert eng.spec.draft_ahead([copying], will_wait=True) and calls == []
    assert not copying.spec_token_ids  # deciding gives out no drafts
    novel = _in_flight("n", list(range(1000, 1040)), [5])
    assert not eng.spec.draft_ahead([novel], will_wait=True) and calls == [1]


def test_large_batches_skip_planning_when_drafts_cannot_pay():
    """At batch 256 the cost model says verifying extra rows never pays, even with every draft
    accepted: no drafts, without asking the proposer (host time per step)."""
    eng = tiny_engine("llama", speculative_method="ngram", num_speculative_tokens=4)
    calls = []
    real = eng.spec.proposer.propose
    eng.spec.proposer.propose = lambda *a: calls.append(1) or real(*a)
    seg = [7, 8, 9, 10, 11, 12]
    big = [_decoding(f"b{i}", seg * 4, [7]) for i in range(256)]
    assert not eng.spec.controller.can_pay(256) and eng.spec.controller.can_pay(1)
    eng.spec.draft_ahead(big)
    assert not any(r.spec_token_ids for r in big) and calls == []
    eng.spec.draft_ahead(big[:1])
    assert big[0].spec_token_ids and calls


def test_a_large_batch_of_poor_acceptance_skips_the_choice_and_probes_a_few_in_turn():
    """Batch 150 could pay only with near-perfect acceptance: with every estimate low (open
    chat), the per-request choice is skipped, and probes take a few requests per turn,
    covering the batch over time instead of the same first ones."""
    eng = tiny_engine("llama", speculative_method="ngram", num_speculative_tokens=4, async_scheduling=True)
    ctl, spec = eng.spec.controller, eng.spec
    assert ctl.can_pay(150) and not ctl.can_pay(150, 0.3) and ctl.can_pay(4, 0.7)
    chat = [_decoding(f"c{i}", [1000 + i, 2000 + i, 3000 + i], [5]) for i in range(150)]
    for r in chat:
        for _ in range(6):
            ctl.record_guess(r.request_id, False)
    chosen = []
    real_choose = ctl.choose_k
    ctl.choose_k = lambda *a, **kw: chosen.append(1) or real_choose(*a, **kw)
    probed = []
    real_look = spec._lookahead
    spec._lookahead = lambda reqs, ks, *a: probed.append([r.request_id for r in reqs]) or real_look(reqs, ks, *a)
    for _ in range(8 * spec.probe_every):
        assert not spec.draft_ahead(chat)
    assert chosen == []
    n = max(4, spec.probe_budget // 150)
    assert len(probed) == 8 and all(len(p) == n for p in probed)
    assert len({rid for p in probed for rid in p}) == 8 * n  # in turn, not the same ones


def test_a_large_batch_looks_first_at_few_new_requests_per_step():
    """Past `first_look_from` requests, the proposer indexes new requests' histories only up to
    `first_look_tokens` a step (the first new one always), the rest in later steps; requests it
    has seen are asked every time; the answers stay in the callers' order. At small batches
    every request is looked at at once."""
    eng = tiny_engine("llama", speculative_method="ngram", num_speculative_tokens=4, async_scheduling=True)
    spec = eng.spec
    spec.first_look_from, spec.first_look_tokens = 8, 100
    seg = [7, 8, 9, 10, 11, 12]
    reqs = [_decoding(f"r{i}", seg * 6, [7]) for i in range(20)]  # 37 tokens each
    asked = []
    real = spec.proposer.propose
    spec.proposer.propose = lambda ids, *a: asked.append(list(ids)) or real(ids, *a)
    found = spec._lookahead(reqs, [4] * 20, batch=20)
    assert asked[-1] == ["r0", "r1"]  # 37 + 37 <= 100; a third would not fit
    assert [f[3] for f in found] == [True, True] + [False] * 18
    assert all(f[2] == 37 for f in found)
    found = spec._lookahead(reqs, [4] * 20, batch=20)
    assert asked[-1] == ["r0", "r1", "r2", "r3"]
    assert [f[3] for f in found][:5] == [True] * 4 + [False]
    spec.on_finished(reqs[0])
    small = [_decoding(f"s{i}", seg * 6, [7]) for i in range(8)]
    spec._lookahead(small, [4] * 8, batch=8)
    assert len(asked[-1]) == 8


def test_lookahead_guesses_are_scored_once_their_token_is_known():
    """The lookahead's first token is a guess at the token in flight; when that token arrives,
    the guess counts as one acceptance trial for free (no verification). A request whose
    guesses keep failing loses the prior's optimism; one whose guesses hold gains."""
    eng = tiny_engine("llama", speculative_method="ngram", num_speculative_tokens=4, async_scheduling=True,
                      speculative_draft_ahead=True)
    ctl = eng.spec.controller
    seg = [7, 8, 9, 10, 11, 12]
    good, bad = _in_flight("good", [1, 2] + seg * 3, [7]), _in_flight("bad", [3, 4] + seg * 3, [7])
    for i in range(6):
        eng.spec.draft_ahead([good, bad])
        eng.spec.clear_drafts()
        for r, nxt in ((good, r_next(good, 2)), (bad, 99 + i)):  # bad never continues the span
            r.output_token_ids[-1] = nxt  # the token in flight lands; the next one goes in flight
            r.output_token_ids.append(-1)
            r.num_computed_tokens += 1
    eng.spec.draft_ahead([good, bad])
    assert ctl.acceptance("good") > ctl.prior > ctl.acceptance("bad")
    assert ctl.stats.proposed == 0  # guesses are not drafts: the metrics do not count them


def r_next(r, back: int = 1) -> int:
    """The token that continues the repeating span at the end of r's history (`back`: the
    position from the end of the newest known token)."""
    seg = [7, 8, 9, 10, 11, 12]
    return seg[(seg.index(r.output_token_ids[-back]) + 1) % len(seg)]


def test_requests_without_evidence_earn_drafts_through_probed_guesses():
    """When drafting looks too costly on the prior alone (a learned high overhead), nobody
    drafts, so no verification evidence could ever arrive. Every few steps the lookahead
    guesses anyway; a request whose guesses keep coming true is then given drafts."""
    eng = tiny_engine("llama", speculative_method="ngram", num_speculative_tokens=4, async_scheduling=True)
    ctl = eng.spec.controller
    ctl._sync[ctl.bucket(1)] = 1.6  # as if learned: a drafting step costs 2.6 plain steps
    seg = [7, 8, 9, 10, 11, 12]
    r = _decoding("copy", [1, 2] + seg * 3, [7])
    assert ctl.choose_k(["copy"], [4], forget_idle=False) == [0]
    planned = []
    for _ in range(40):
        eng.spec.draft_ahead([r])
        planned.append(bool(r.spec_token_ids))
        eng.spec.clear_drafts()
        r.output_token_ids.append(r_next(r))
        r.num_computed_tokens += 1
    assert not planned[0] and planned[-1]


def test_each_job_gets_its_own_governor_verdict():
    """A worker's engine runs job after job. A verdict learned on open chat must not carry into
    the next job (which starts unmeasured, speculation first); a job that comes back resumes its
    own; a sample decided for one job is not filed under another; a finished job's state goes."""
    from engine.spec_decode import SpecGovernor
    g = SpecGovernor(explore_every=8, warm=1)
    g.use_job("chat")
    picks = []
    for _ in range(60):
        p = g.speculate(8)
        picks.append(p)
        g.observe(8, p, 100 if p else 300, 1.0, job="chat")
    assert picks[-30:].count(True) <= 4
    g.use_job("extract")
    assert g.speculate(8) is True and not g.samples  # unmeasured: speculation first
    g.observe(8, True, 900, 1.0, job="chat")  # (a step in flight, decided for the chat job)
    assert not g.samples
    g.observe(8, True, 900, 1.0, job="extract")
    g.use_job("chat")
    assert g.speculate(8) is False and len(g.samples[(g.bucket(8), False)]) > 1  # chat's own verdict
    g.use_job("extract")
    assert list(g.samples) == [(g.bucket(8), True)]
    g.forget_job("chat")
    g.use_job("chat")
    assert not g.samples


def test_the_engine_decides_for_the_job_with_most_requests():
    prompts = copy_heavy_prompts(6)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    eng = tiny_engine("llama", async_scheduling=True, speculative_method="ngram", num_speculative_tokens=3)
    for i, p in enumerate(prompts):
        eng.add_request(f"a{i}", p, sp, job_id="a" if i < 4 else "b")
    jobs = set()
    while eng.has_unfinished():
        eng.step()
        jobs.add(eng.spec.governor.job)
    assert "a" in jobs and eng.spec._live == {}
    assert eng.spec.governor._saved == {}
    eng.add_request("c0", prompts[0], sp, job_id="c")
    eng.step()
    assert eng.spec.governor.job == "c" and eng.spec.decided_job == "c"


def test_governor_notices_when_the_workload_turns_copyable():
    """A long stretch where speculation lost (open chat) must not keep it off once the text
    becomes copyable: re-checks stay at most `max_every` apart and measure speculation afresh,
    so within about one interval it wins again."""
    from engine.spec_decode import SpecGovernor
    g = SpecGovernor(explore_every=4, explore_steps=2, max_every=16, warm=1)

    def run(steps: int, spec_rate: float) -> list[bool]:
        picks = []
        for _ in range(steps):
            p = g.speculate(8)
            picks.append(p)
            g.observe(8, p, tokens=spec_rate if p else 300, seconds=1.0)
        return picks
    assert run(300, 100).count(True) < 60  # chat: mostly plain
    later = run(60, 900)  # copyable: speculation triples the rate
    assert later[-30:].count(True) >= 25


def _eager_drafter(method: str, **kw):
    """An engine whose controller drafts wherever the proposer finds something: the tiny random
    model continues copied spans only by chance, and these tests are about exactness. Drafts go
    ahead of the step in flight unless the test says otherwise."""
    kw.setdefault("speculative_draft_ahead", True)
    eng = tiny_engine("llama", speculative_method=method, num_speculative_tokens=4, async_scheduling=True, **kw)
    ctl = eng.spec.controller
    ctl.sync_factor = ctl.max_sync = 0.0
    ctl.min_gain = 0.0
    ctl.prior = 0.95
    eng.spec.governor = None
    return eng


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_drafting_steps_keep_the_overlap_and_stay_exact(method):
    """After a plain step, drafts continue its token in flight as the proposer guesses it: the
    host does not wait for it. Drafts that followed a wrong guess are rejected, those that
    followed the right one are accepted, and the output equals plain decoding. The host waits
    only for a step in flight that verified drafts."""
    prompts = copy_heavy_prompts(10) + mixed_prompts(6, 256, 20, 40, seed=5)
    sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    plain = run_engine(tiny_engine("llama", async_scheduling=True), prompts, sp)
    eng = _eager_drafter(method)
    early, chained = [], []
    wait, record = eng._wait_inflight, eng.spec.record

    def spy_wait(t_start):
        early.append(eng._inflight is not None and eng._inflight.speculated)
        return wait(t_start)

    def spy_record(r, k, a, assumed, base):
        chained.append((len(assumed), a))
        return record(r, k, a, assumed, base)
    eng._wait_inflight, eng.spec.record = spy_wait, spy_record
    out = run_engine(eng, prompts, sp)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert all(early) and eng.counters["spec_wait_steps"] == len(early)
    assert any(n for n, a in chained)  # drafts after a token in flight
    if method == "ngram":  # (the tiny model repeats itself so that n-gram guesses come true)
        assert any(n and a for n, a in chained)
    assert eng.stats()["spec_accepted"] > 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert all(r.num_unverified == 0 for r in eng.scheduler.running)


def test_overlapped_drafting_keeps_seeded_sampling_and_logprobs():
    """Seeded sampling keys its noise by output position; with drafts accepted by a step still in
    flight, the next step's positions are known only on the device, and the noise must follow
    them. Logprobs come back for every token, drafted or not."""
    prompts = copy_heavy_prompts(6)
    params = [SamplingParams(max_tokens=24, temperature=0.3, top_k=20, seed=100 + i, ignore_eos=True,
                             logprobs=True) for i in range(len(prompts))]
    plain = run_engine(tiny_engine("llama", async_scheduling=True), prompts, params)
    eng = _eager_drafter("ngram", prompt_lookup_min=1)
    spec = run_engine(eng, prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert eng.stats()["spec_accepted"] > 0
    import torch
    for o, p in zip(spec, plain):
        assert len(o.logprobs) == len(o.token_ids)
        assert torch.allclose(torch.tensor(o.logprobs), torch.tensor(p.logprobs), atol=1e-4)
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=True)
    g_plain = run_engine(tiny_engine("llama", async_scheduling=True), prompts, greedy)
    g_spec = run_engine(_eager_drafter("suffix"), prompts, greedy)
    for o, p in zip(g_spec, g_plain):
        assert o.token_ids == p.token_ids and len(o.logprobs) == len(o.token_ids)
        assert torch.allclose(torch.tensor(o.logprobs), torch.tensor(p.logprobs), atol=1e-4)


@pytest.mark.parametrize("ahead", [True, False], ids=["draft-ahead", "wait"])
@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_overlapped_drafting_under_preemption_and_stops(method, ahead):
    """A small pool preempts requests whose drafts are in flight; stop tokens and max_tokens
    end requests while drafts are in flight (a drafting step stays in flight in both modes).
    Output equals plain decoding, no block leaks."""
    prompts = copy_heavy_prompts(16)
    plain_eng = tiny_engine("llama", async_scheduling=True, num_gpu_blocks_override=40, max_num_batched_tokens=128)
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = run_engine(plain_eng, prompts, sp)
    eng = _eager_drafter(method, num_gpu_blocks_override=40, max_num_batched_tokens=128,
                         speculative_draft_ahead=ahead)
    out = run_engine(eng, prompts, sp)
    assert eng.scheduler.num_preemptions > 0 and eng.stats()["spec_accepted"] > 0
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert eng.block_manager.num_free_blocks == 40
    stop_at = plain[0].token_ids[9]
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[stop_at]),
              *[SamplingParams(max_tokens=3 + i, temperature=0, ignore_eos=True) for i in range(7)]]
    out = run_engine(eng, prompts[:8], params)
    assert out[0].token_ids == plain[0].token_ids[:plain[0].token_ids.index(stop_at) + 1]
    for i, o in enumerate(out[1:], start=1):
        assert o.token_ids == plain[i].token_ids[:3 + i - 1] and o.finish_reason == "length"
    assert eng.block_manager.num_free_blocks == 40


def test_overlapped_drafting_through_the_triton_kernels(monkeypatch):
    """The same run with every op on its Triton kernel (interpreted on the CPU): the patch of the
    next step's inputs and the greedy acceptance kernel give the plain run's output."""
    monkeypatch.setenv("PREFIXQ_KERNELS", "triton")
    prompts = copy_heavy_prompts(4)
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = run_engine(tiny_engine("llama", async_scheduling=True), prompts, sp)
    eng = _eager_drafter("ngram")
    out = run_engine(eng, prompts, sp)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert eng.stats()["spec_accepted"] > 0


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_without_drafting_ahead_every_draft_follows_known_tokens(method):
    """speculative_draft_ahead=False: the host waits for the step in flight before drafting, so
    no draft assumes anything about tokens it has not seen; output equals plain decoding."""
    prompts = copy_heavy_prompts(8)
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = run_engine(tiny_engine("llama", async_scheduling=True), prompts, sp)
    eng = _eager_drafter(method, speculative_draft_ahead=False)
    assumed = []
    record = eng.spec.record
    eng.spec.record = lambda r, k, a, asm, base: assumed.append(asm) or record(r, k, a, asm, base)
    out = run_engine(eng, prompts, sp)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert assumed and not any(assumed) and eng.counters["spec_wait_steps"] > 0


def test_never_waiting_shifts_mixed_prefill_and_decode_steps(monkeypatch):
    """Drafting steps always in flight (never waiting, as measured on the GPU at a352aa8), while
    new requests are admitted: steps that mix prefill chunks (the extend layout) with decodes
    shifted by the drafts in flight must still give plain decoding's output."""
    import kernels.ops as kops
    from engine import model_runner
    layouts = []
    real = kops.patch_step_inputs

    def spy(ids, pos, slots, ctx, samp, table, bs, prev_tokens, prev_offsets, *rest):
        if prev_offsets is not None:
            layouts.append("decode" if ctx.shape[0] == ids.shape[0] else "extend")
        return real(ids, pos, slots, ctx, samp, table, bs, prev_tokens, prev_offsets, *rest)
    monkeypatch.setattr(model_runner.ops, "patch_step_inputs", spy)
    prompts = copy_heavy_prompts(12)
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = run_engine(tiny_engine("llama", async_scheduling=True, max_num_seqs=4), prompts, sp)
    eng = _eager_drafter("ngram", max_num_seqs=4)
    eng.spec.would_draft = lambda running: False  # never wait for a verification in flight
    out = run_engine(eng, prompts, sp)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert "extend" in layouts and "decode" in layouts
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_token_slice_reads_prompt_outputs_and_drafts_as_one_sequence():
    from engine.request import Request
    r = Request("x", [1, 2, 3], SamplingParams())
    r.output_token_ids, r.spec_token_ids = [4, 5, 6], [7, 8, 9]
    full = list(range(1, 10))
    assert all(r.token_slice(a, b) == full[a:b] for a in range(10) for b in range(a, 10))


def test_a_prefill_launch_is_not_charged_to_the_decode_step_finished_after_it():
    """With overlap, the step finished in a call ends after that call launched the next step. A
    prefill launched eagerly (here made to cost 1 s) must not be learned as the cost of the
    decode step finished after it: the governor's samples and the controller's plain-step
    time stay at decode-step cost, and greedy output is unchanged."""
    import time

    prompts = copy_heavy_prompts(9)
    params = [SamplingParams(max_tokens=6 + 5 * (i % 3), temperature=0, ignore_eos=True) for i in range(9)]
    plain = run_engine(tiny_engine("llama", max_num_seqs=3), prompts, params)
    eng = tiny_engine("llama", max_num_seqs=3, async_scheduling=True, speculative_method="ngram",
                      num_speculative_tokens=3)
    forward = eng.runner.forward

    def slow_prefill(inp):
        if not inp.meta.is_decode:
            time.sleep(1.0)
        return forward(inp)
    eng.runner.forward = slow_prefill
    gov, ctl, seen = eng.spec.governor, eng.spec.controller, []
    observe_gov, observe_ctl, observe = gov.observe, ctl.observe_step, eng.spec.observe
    gov.observe = lambda b, m, tok, sec, *rest: (seen.append(("gov", sec)), observe_gov(b, m, tok, sec, *rest))
    ctl.observe_step = lambda *a, **kw: (seen.append(("ctl", a[4] if a[5] else 0.0)), observe_ctl(*a, **kw))
    tainted = []
    eng.spec.observe = lambda *a, **kw: (tainted.append(kw.get("tainted", False)), observe(*a, **kw))
    import gc
    gc.collect()
    gc.disable()  # a full collection of this process's heap can stall a step for 0.3 s on its own
    try:
        spec = run_engine(eng, prompts, params)
    finally:
        gc.enable()
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert sum(tainted) >= 3  # admissions mid-run did land in decode steps' periods
    decode_samples = [sec for who, sec in seen]
    # (a decode step takes a few ms, but on a loaded 2-core machine stalls of up to 0.45 s were seen)
    assert decode_samples and max(decode_samples) < 0.8
    assert all(s < 0.8 for s in ctl._plain_s.values())


def test_a_step_with_prefill_rows_run_as_decode_rows_is_not_a_decode_sample():
    """On the GPU an admission whose rows fit a decode graph runs as decode rows: the step is a
    decode step to the kernels, but its time (here made 60 ms) is not a decode step's. The
    governor and the controller must not learn from it; greedy output is unchanged."""
    import time

    prompts = copy_heavy_prompts(9)
    params = [SamplingParams(max_tokens=6 + 5 * (i % 3), temperature=0, ignore_eos=True) for i in range(9)]
    plain = run_engine(tiny_engine("llama", max_num_seqs=3), prompts, params)
    eng = tiny_engine("llama", max_num_seqs=3, async_scheduling=True, speculative_method="ngram",
                      num_speculative_tokens=3)
    eng.runner.max_prefill_rows_as_decode = 512
    forward, as_decode = eng.runner.forward, []

    def slow_prefill(inp):
        if inp.has_prefill:
            as_decode.append(inp.meta.is_decode)
            time.sleep(0.06)
        return forward(inp)
    eng.runner.forward = slow_prefill
    gov, ctl, seen = eng.spec.governor, eng.spec.controller, []
    observe_gov, observe_ctl = gov.observe, ctl.observe_step
    gov.observe = lambda b, m, tok, sec, *rest: (seen.append(sec), observe_gov(b, m, tok, sec, *rest))
    ctl.observe_step = lambda *a, **kw: (seen.append(a[4] if a[5] else 0.0), observe_ctl(*a, **kw))
    spec = run_engine(eng, prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert sum(as_decode) >= 3  # admissions did run as decode rows
    assert seen and max(seen) < 0.05


def test_the_governor_files_a_sample_under_the_batch_it_decided_for():
    """A step's sample counts for the number of requests running when the governor decided (the
    batch size it decided for), not for the rows or requests of the step itself."""
    eng = tiny_engine("llama", async_scheduling=True, speculative_method="ngram", num_speculative_tokens=3)
    gov = eng.spec.governor
    eng.spec.observe(5, True, 12, 0.01, rows=20, drafted=True, decode_only=True, running=10, job=gov.job)
    assert set(gov.samples) == {(gov.bucket(10), True)}
    eng.spec.observe(5, False, 5, 0.01, decode_only=True, job=gov.job)  # (no running count: the step's)
    assert (gov.bucket(5), False) in gov.samples


def test_default_draft_length_depends_on_the_proposer():
    """Host-side lookups draft up to 8 tokens by default (measured faster than 4 on the H100);
    a draft model, which runs a forward per draft token, 4; an explicit k is kept."""
    from engine.config import EngineConfig
    assert EngineConfig(model="m", speculative_method="ngram").num_speculative_tokens == 8
    assert EngineConfig(model="m", speculative_method="suffix").num_speculative_tokens == 8
    assert EngineConfig(model="m", speculative_model="d").num_speculative_tokens == 4
    assert EngineConfig(model="m", speculative_method="ngram", num_speculative_tokens=3).num_speculative_tokens == 3
    assert EngineConfig(model="m").num_speculative_tokens == 0
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(model="m", speculative_method="ngram", num_speculative_tokens=-2)


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_admissions_cut_to_fit_a_graph_keep_speculation_exact(method):
    """Admissions while others verify drafts are cut to fit the (forced) graph rows and reads,
    with those drafts' rows counted: greedy output equals speculation off, and steps that both
    verify drafts and prefill a cut chunk do occur."""
    segs = mixed_prompts(16, 256, 10, 16, seed=41)
    prompts = [s * 6 + s[:4] for s in segs]  # 64-100 tokens, copyable
    # uneven lengths: requests finish one by one, so admissions come while others verify
    sp = [SamplingParams(max_tokens=8 + 7 * (i % 4), temperature=0, ignore_eos=True) for i in range(16)]
    plain = run_engine(tiny_engine("llama"), prompts, sp)
    eng = tiny_engine("llama", max_num_seqs=3, async_scheduling=True, max_num_batched_tokens=256,
                      speculative_method=method, num_speculative_tokens=4, adaptive_speculation=False)
    eng.runner.max_prefill_rows_as_decode = eng.scheduler.graph_rows = 80
    eng.runner.max_decode_row_reads = eng.scheduler.graph_reads = 6000
    mixed, prepare = [], eng.runner.prepare

    def spy(batch, *a, **kw):
        inp = prepare(batch, *a, **kw)
        if inp.has_prefill and inp.draft_ids is not None:
            mixed.append((inp.meta.is_decode, batch.total_tokens))
        return inp
    eng.runner.prepare = spy
    spec = run_engine(eng, prompts, sp)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert eng.stats()["spec_accepted"] > 0
    assert len(mixed) >= 3 and all(dec and n <= 80 for dec, n in mixed)


@pytest.mark.parametrize("waits", [True, False])
def test_drafting_time_is_charged_to_the_step_it_drafted_for(waits):
    """With overlap, a step finishes inside the next step's call, after that call has decided and
    drafted (and, where drafts are due, waited for it). That drafting belongs to the next step:
    the plain step before a speculating one must not carry it, and the last speculating step
    before plain ones must not go without it. Here each speculating-mode call drafts for 0.5 s
    and, with `waits`, waits for the step in flight and drafts 0.5 s more (1 s in all)."""
    import gc
    import time

    eng = tiny_engine("llama", max_num_seqs=4, async_scheduling=True, speculative_method="ngram",
                      num_speculative_tokens=3)
    spec = eng.spec
    modes = iter([False] * 5 + [True] * 4 + [False] * 4 + [True] * 3 + [False] * 100)
    spec.should_speculate = lambda n: next(modes)

    def slow_draft(running, will_wait=False):
        time.sleep(0.5)
        return will_wait and waits  # (wait for the step in flight, then draft nothing)

    spec.draft_ahead = slow_draft
    seen: list[tuple[bool, float]] = []
    observe = spec.governor.observe
    spec.governor.observe = lambda b, m, tok, sec, *rest: (seen.append((m, sec)), observe(b, m, tok, sec, *rest))
    early: list[bool] = []  # per step handed to the decoder: finished early, without drafts
    observe_spec = spec.observe
    spec.observe = lambda *a, **kw: (early.append(kw["early"] and not kw["drafted"]), observe_spec(*a, **kw))[1]
    learned_early: list[bool] = []  # per plain-step sample of the controller: was it such a step?
    observe_ctl = spec.controller.observe_step
    spec.controller.observe_step = lambda b, rows, drafted, ov, sec, *rest: (
        learned_early.append(early[-1]) if not drafted else None, observe_ctl(b, rows, drafted, ov, sec, *rest))
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True) for _ in range(4)]
    gc.collect()
    gc.disable()  # (a full collection can stall a step for 0.3 s on a loaded machine)
    try:
        run_engine(eng, mixed_prompts(4, 256, 8, 16, seed=3), params)
    finally:
        gc.enable()
    plain = [s for m, s in seen if not m]
    drafting = [s for m, s in seen if m]
    assert len(drafting) >= 6 and len(plain) >= 8
    assert min(drafting) >= (1.0 if waits else 0.5), drafting
    assert max(plain) < 0.5, plain  # (milliseconds; with two busy processes beside it, 0.2 s was seen)
    # A step finished by the wait of a speculating call, before that call launched its step,
    # has a period without a launch (0.1-0.2 ms on the H200): it is no plain-step sample.
    assert learned_early and not any(learned_early)
    assert sum(early) >= (2 if waits else 0)  # (the plain step before each speculating stretch)


def test_one_time_index_builds_are_not_learned_as_drafting_cost():
    """The suffix proposer indexes a request's whole history at its second look (and a job's
    finished outputs when a proposal reads them): a one-time cost, which the governor and the
    controller must not learn as what drafting costs from then on. Here every such build is
    made to take 1 s; no step time the controller learns from may carry it (the governor is
    handed the same times), and output is unchanged.
    (Learned as drafting's cost, the first build priced drafting out, and the proposer's looks
    stopped.)"""
    import gc
    import time

    from engine.spec.suffix_index import SuffixIndex

    prompts = copy_heavy_prompts(6)
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain = run_engine(tiny_engine("llama", max_num_seqs=3), prompts, sp)
    eng = tiny_engine("llama", max_num_seqs=3, async_scheduling=True, speculative_method="suffix",
                      num_speculative_tokens=3)
    eng.spec.governor = None  # (speculating mode throughout: the proposer's looks go on whatever the timing)
    builds = []
    append = SuffixIndex.append

    def slow_build(self, new_tokens, index_last=False):
        if self.lazy:
            builds.append(len(new_tokens))
            time.sleep(1.0)
        return append(self, new_tokens, index_last)

    seen: list[float] = []
    observe_ctl = eng.spec.controller.observe_step
    eng.spec.controller.observe_step = lambda *a, **kw: (seen.append(a[4]), observe_ctl(*a, **kw))
    gc.collect()
    gc.disable()
    try:
        SuffixIndex.append = slow_build
        out = run_engine(eng, prompts, sp)
    finally:
        SuffixIndex.append = append
        gc.enable()
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert len(builds) >= 2 and seen
    # (a step takes milliseconds; with two busy processes beside it, 0.2 s was seen)
    assert max(seen) < 0.8, sorted(seen)[-5:]
