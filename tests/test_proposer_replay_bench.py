"""bench.proposer_replay: a recording of proposer calls replays into a fresh proposer with the
same drafts, and a recording whose drafts do not match is reported as such."""
import pickle
import random


def _recording(path, method: str = "suffix") -> None:
    from engine.spec import NgramProposer, SuffixProposer
    prop = SuffixProposer() if method == "suffix" else NgramProposer(1, 4)
    rng = random.Random(3)
    seg = [rng.randrange(50) for _ in range(12)]
    hists = {f"r{i}": seg * 3 + [rng.randrange(50) for _ in range(5)] for i in range(4)}
    events = []
    for step in range(12):
        ids = list(hists)
        hs = [list(hists[r]) for r in ids]
        out = prop.propose(ids, hs, [4] * len(ids), ["job"] * len(ids))
        events.append(("propose", ids, hs, [4] * len(ids), ["job"] * len(ids), out))
        for r, d in zip(ids, out):
            hists[r] += (d[:2] or [rng.randrange(50)])
        if step == 6:
            done = ids[0]
            events.append(("finished", done, hists[done][-10:], "job"))
            prop.on_finished(done, hists.pop(done)[-10:], "job")
    assert any(d for e in events if e[0] == "propose" for d in e[5])  # something to compare
    with open(path, "wb") as f:
        pickle.dump({"method": method, "workload": "test", "batch": 4, "requests": 4, "max_tokens": 16,
                     "prompt_lookup": (1, 4), "events": events}, f)


def test_a_recording_replays_with_the_same_drafts(tmp_path):
    from bench.proposer_replay import replay
    for method in ("suffix", "ngram"):
        path = tmp_path / f"{method}.pkl"
        _recording(path, method)
        fig = replay(str(path), 2)
        assert fig["same_drafts"] == 1 and fig["calls"] == 12 and fig["ms_per_call"] > 0


def test_a_replay_that_proposes_other_drafts_says_so(tmp_path):
    from bench.proposer_replay import replay
    path = tmp_path / "rec.pkl"
    _recording(path)
    with open(path, "rb") as f:
        rec = pickle.load(f)
    ev = rec["events"][-1]
    rec["events"][-1] = ev[:5] + ([d + [7] for d in ev[5]],)
    with open(path, "wb") as f:
        pickle.dump(rec, f)
    assert replay(str(path), 1)["same_drafts"] == 0


def test_matched_tokens_count_the_drafts_the_real_continuation_holds(tmp_path):
    """Every recorded draft of the test recording is checked against the request's real
    continuation (its later history and finished output): the count is exact."""
    from bench.proposer_replay import continuations, replay
    path = tmp_path / "rec.pkl"
    _recording(path)
    with open(path, "rb") as f:
        rec = pickle.load(f)
    truth = continuations(rec)
    want = proposed = 0
    for ev in rec["events"]:
        if ev[0] != "propose":
            continue
        for rid, h, d in zip(ev[1], ev[2], ev[5]):
            assert truth[rid][:len(h)] == h
            real = truth[rid][len(h):]
            n = 0
            while n < len(d) and n < len(real) and d[n] == real[n]:
                n += 1
            want, proposed = want + n, proposed + len(d)
    fig = replay(str(path), 1)
    assert fig["same_drafts"] == 1 and fig["matched_tokens"] == want > 0 and fig["proposed_tokens"] == proposed
