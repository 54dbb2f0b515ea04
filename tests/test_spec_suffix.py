"""Suffix proposer index: the bulk build path matches the token-by-token one."""


def test_bulk_indexing_builds_the_same_tables_as_token_by_token():
    import random

    from engine.spec.suffix_index import SuffixIndex
    rng = random.Random(3)
    words = [rng.randrange(50) for _ in range(20)]
    tokens = [rng.choice(words) for _ in range(700)]
    bulk, step = SuffixIndex(32, 4), SuffixIndex(32, 4)
    bulk.append(tokens[:500])  # one long append takes the bulk path
    bulk.append(tokens[500:])
    for i in range(0, len(tokens), 7):  # short appends take the per-token loop
        step.append(tokens[i:i + 7])
    assert bulk.indexed_to == step.indexed_to
    for n in bulk.lengths:
        norm = lambda table: {k: [v] if isinstance(v, int) else v[-4:] for k, v in table.items()}  # noqa: E731
        assert norm(bulk.tables[n]) == norm(step.tables[n]), n


def test_finished_sequences_index_like_the_token_loop_and_only_when_read():
    """A job's finished outputs are indexed in bulk (`append_sequence`), giving the same tables
    as the token-by-token loop over output + SEP; and only when a proposal reads the job's
    index, so a large batch that never drafts never pays for it. Eviction keeps the newest."""
    import random

    from engine.spec.suffix import _JobIndex
    from engine.spec.suffix_index import SEP, SuffixIndex
    rng = random.Random(5)
    words = [rng.randrange(40) for _ in range(15)]
    seqs = [[rng.choice(words) for _ in range(rng.randrange(1, 90))] for _ in range(30)]
    bulk, step = SuffixIndex(32, 4), SuffixIndex(32, 4)
    for s in seqs:
        bulk.append_sequence(s)
        step.append(s + [SEP], index_last=True)
    assert bulk.tokens == step.tokens and bulk.indexed_to == step.indexed_to
    norm = lambda table: {k: [v] if isinstance(v, int) else v[-4:] for k, v in table.items()}  # noqa: E731
    for n in bulk.lengths:
        assert norm(bulk.tables[n]) == norm(step.tables[n]), n
    job = _JobIndex(max_tokens=600, max_depth=32, max_occ=4)
    for s in seqs:
        job.add(s)
    assert len(job.newer) == 0 and job.older is None  # nothing indexed until read
    # the queue keeps only what the cap could hold: the newest outputs
    queued = list(job._queued)
    assert job.size <= 600 and queued == seqs[len(seqs) - len(queued):]
    job.max_per_read = 4
    while job._queued:
        n = len(job._queued)
        indexes = job.indexes
        assert len(job._queued) == max(0, n - 4)
    # two generations of at most half the cap each, newest first, oldest outputs dropped whole
    newer, older = indexes
    assert len(newer) <= 300 and len(older) <= 300
    held = older.tokens + newer.tokens
    kept = seqs[len(seqs) - held.count(SEP):]
    assert held == [t for s in kept for t in s + [SEP]]
    for idx, part in ((older, kept[:older.tokens.count(SEP)]), (newer, kept[older.tokens.count(SEP):])):
        ref = SuffixIndex(32, 4)
        for s in part:
            ref.append(s + [SEP], index_last=True)
        assert idx.tokens == ref.tokens
        for n in idx.lengths:
            assert norm(idx.tables[n]) == norm(ref.tables[n]), n


def test_a_long_job_indexes_each_output_once():
    """Past the cap, the oldest generation is dropped whole: each output is indexed once, however
    long the job (rebuilding from the kept outputs indexed each about four times), and the
    index never starts over empty."""
    from engine.spec.suffix import SuffixProposer
    from engine.spec.suffix_index import SuffixIndex
    p = SuffixProposer(max_job_tokens=2000)
    indexed = []
    real = SuffixIndex.append_sequence

    def counting(self, seq):
        indexed.append(len(seq))
        return real(self, seq)
    SuffixIndex.append_sequence = counting
    try:
        template = [900, 901, 902]
        for i in range(400):
            p.on_finished(f"r{i}", template + [1000 + i % 7, 903, 904] + [5000 + i] * 3, job_id="job")
            held = p._jobs["job"].indexes
            assert sum(len(x) for x in held) <= 2000
            # the structure of the job's outputs is always there to draft from
            assert p.propose(["n"], [[7, 900, 901]], [1], job_ids=["job"]) == [[902]]
    finally:
        SuffixIndex.append_sequence = real
    assert len(indexed) == 400 and sum(indexed) == 400 * 9


def test_one_proposal_call_indexes_at_most_max_per_read_queued_outputs():
    """The job's generations are read once per call, so a call for many requests of the job
    indexes no more queued outputs than one read may (a probe at a large batch's tail stalled
    a step indexing hundreds when every request's match read them)."""
    from engine.spec.suffix import SuffixProposer, _JobIndex
    p = SuffixProposer()
    for i in range(40):
        p.on_finished(f"r{i}", [900, 901, 902, 1000 + i, 903] * 4, job_id="job")
    job = p._jobs["job"]
    assert isinstance(job, _JobIndex) and len(job._queued) == 40
    ids = [f"n{i}" for i in range(12)]
    drafts = p.propose(ids, [[7, 8, 900, 901]] * 12, [2] * 12, job_ids=["job"] * 12)
    assert len(job._queued) == 40 - job.max_per_read
    assert all(d[:1] == [902] for d in drafts)  # (the template, from the outputs indexed)


def test_a_job_index_leaves_nothing_for_the_garbage_collector_to_scan():
    """Occurrences of repeated n-grams live in tuples of ints, which the collector stops
    tracking: a job index of repetitive outputs (hundreds of thousands of repeated n-grams in
    a real job) adds no work to a full collection. As lists they made every full collection
    a 300 ms stall of whichever step it fell in."""
    import gc
    import random

    from engine.spec.suffix_index import SuffixIndex
    rng = random.Random(7)
    words = [rng.randrange(60) for _ in range(25)]
    idx = SuffixIndex(32, 8)
    for _ in range(40):
        idx.append_sequence([rng.choice(words) for _ in range(120)])
    idx.append([rng.choice(words) for _ in range(200)])  # the per-token path too
    repeated = [v for t in idx.tables.values() for v in t.values() if not isinstance(v, int)]
    assert len(repeated) > 500 and max(len(v) for v in repeated) <= 16
    gc.collect()
    assert not any(gc.is_tracked(v) for v in repeated)


def test_generations_match_as_one_index():
    """Matching a job's two generations together drafts what one index over all their outputs
    would: the same longest suffix, occurrences, counts and ties."""
    import random

    from engine.spec.suffix_index import SuffixIndex, match_generations
    rng = random.Random(11)
    for trial in range(200):
        words = [rng.randrange(30) for _ in range(rng.randrange(2, 12))]
        seqs = [[rng.choice(words) for _ in range(rng.randrange(1, 40))] for _ in range(rng.randrange(2, 12))]
        cut = rng.randrange(1, len(seqs))
        occ = rng.choice([2, 4, 32])
        whole, older, newer = SuffixIndex(16, occ), SuffixIndex(16, occ), SuffixIndex(16, occ)
        for i, s in enumerate(seqs):
            whole.append_sequence(s)
            (older if i < cut else newer).append_sequence(s)
        for _ in range(10):
            src = rng.choice(seqs)
            end = rng.randrange(1, len(src) + 1)
            ctx = [rng.choice(words)] * rng.randrange(2) + src[max(0, end - rng.randrange(1, 20)):end]
            k, min_prob = rng.randrange(0, 8), rng.choice([0.0, 0.1, 0.5])
            got = match_generations((newer, older), ctx, k, min_prob, 1.0)
            assert got == whole.match(ctx, k, min_prob, 1.0), (trial, ctx)


def test_suffix_keys_from_a_tail_index_match_keys_from_the_context():
    """The proposer keys the context's suffixes from the request's own index (whose tokens end
    with the context) instead of hashing the context again: both give the same matches, by
    the prefix-hash path (long appends, numpy) and the token loop alike."""
    import random

    from engine.spec.suffix_index import SuffixIndex, gram_key
    rng = random.Random(13)
    words = [rng.randrange(5000) for _ in range(12)]
    job = SuffixIndex(32, 8)
    for _ in range(30):
        job.append_sequence([rng.choice(words) for _ in range(rng.randrange(5, 60))])
    for trial in range(100):
        hist = [rng.choice(words) for _ in range(rng.randrange(1, 120))]
        tail = SuffixIndex(8, 8)
        cut = rng.randrange(len(hist) + 1)
        tail.append(hist[:cut])
        tail.append(hist[cut:])  # (bulk and token-loop prefix hashes alike)
        ctx = hist[-32:]
        assert all(tail.tail_key(n) == gram_key(ctx[len(ctx) - n:]) for n in range(1, len(ctx) + 1))
        k = rng.randrange(1, 8)
        assert job.match(ctx, k, 0.1, 1.0, tail=tail) == job.match(ctx, k, 0.1, 1.0), trial


def test_a_held_index_matches_as_the_indexed_one_does():
    """A request's first look holds its history without indexing it; numpy scans answer the
    lookups. Every match (context, k, overlap) equals the indexed index's, including repeated
    n-grams past max_occ occurrences; the next append indexes everything."""
    import random

    from engine.spec.suffix_index import SuffixIndex
    rng = random.Random(4)
    for trial in range(120):
        vocab = rng.choice([3, 6, 40])
        hist = [rng.randrange(vocab) for _ in range(rng.randint(0, 400))]
        held, full = SuffixIndex(8, 4), SuffixIndex(8, 4)
        held.hold(hist)
        full.append(hist)
        assert held.lazy and not any(held.tables.values())
        for _ in range(6):
            k = rng.randint(1, 8)
            ctx = hist[-rng.randint(1, 32):] if hist else []
            a = held.match(ctx, k, 0.1, 1.0, self_overlap=True, tail=held)
            b = full.match(ctx, k, 0.1, 1.0, self_overlap=True, tail=full)
            assert (a.tokens, a.probs, a.match_len) == (b.tokens, b.probs, b.match_len), trial
        more = [rng.randrange(vocab) for _ in range(3)]
        held.append(more)
        full.append(more)
        assert not held.lazy and held.tables == full.tables


def test_a_single_occurrence_drafts_the_tokens_that_follow_it():
    """The one-occurrence shortcut in `match` (copying from a prompt) gives what the general
    continuation loop gives: the tokens after the occurrence, cut at a separator, each with
    probability 1; near the store's end the loop still runs (periodic text drafts from itself)."""
    from engine.spec.suffix_index import SEP, SuffixIndex
    prompt = list(range(100, 160))
    idx = SuffixIndex(8, 32)
    idx.append(prompt + [107, 108, 109])  # the context ends with 107 108 109: once in the prompt
    d = idx.match(idx.tokens[-8:], 8, 0.1, 1.0, self_overlap=True, tail=idx)
    assert d.tokens == list(range(110, 113)) and d.probs == [1.0] * 3 and d.match_len == 3
    # a longer match allows a longer draft (capped by the match length times spec_factor)
    idx.append([110, 111, 112, 113, 114])
    d = idx.match(idx.tokens[-8:], 8, 0.1, 1.0, self_overlap=True, tail=idx)
    assert d.tokens == list(range(115, 123)) and d.match_len == 8
    # a job index: a finished sequence's continuation stops at its separator
    job = SuffixIndex(32, 32)
    job.append_sequence([5, 6, 7, 8, 9, 10])
    job.append_sequence([20, 21, 22])
    d = job.match([1, 2, 7, 8], 8, 0.1, 1.0)
    assert d.tokens == [9, 10] and SEP not in d.tokens
    # periodic text: the occurrence runs into the store's end, so the draft continues itself
    per = SuffixIndex(8, 32)
    per.append([1, 2, 3, 1, 2, 3, 1, 2])
    d = per.match(per.tokens[-8:], 6, 0.1, 1.0, self_overlap=True, tail=per)
    assert d.tokens[:3] == [3, 1, 2]


def test_a_job_index_that_does_not_pay_is_read_only_to_recheck_it():
    """A job index's drafts are scored once the request's real tokens arrive: the tokens by
    which a draft it won matched better than the request's own. A job whose index keeps losing
    reads it only every `recheck_every` calls (no indexing, no lookups in between); one whose
    index wins keeps reading it; and a recheck that finds it winning again turns it back on."""
    from engine.spec.suffix import SuffixProposer

    p = SuffixProposer()
    for i in range(20):  # outputs that continue [900, 901] with 902
        p.on_finished(f"r{i}", [900, 901, 902, 903] * 3, job_id="job")
    job = p._jobs["job"]
    reads = []
    real = type(job).indexes

    class Counting(type(job)):
        @property
        def indexes(self):
            reads.append(1)
            return real.fget(self)
    job.__class__ = Counting

    def call(i: int, truth: int) -> list[int]:
        # a request whose own history has no match for [900, 901]: the job index's draft wins
        rid = f"n{i}"
        d = p.propose([rid], [[7, 8, 900, 901]], [2], job_ids=["job"])[0]
        p.propose([rid], [[7, 8, 900, 901, truth, 5]], [0], job_ids=["job"])  # its real tokens arrive: scored
        p.on_finished(rid, [truth, 5], job_id=None)
        return d

    assert call(0, 902)[:1] == [902]
    assert job.scored == 1 and job.gain > 0
    for i in range(1, job.warm + 1):  # the job's requests go elsewhere: its drafts are wrong
        call(i, 77)
    assert job.gain < job.min_gain * job.scores
    reads.clear()
    drafts = [call(1000 + i, 77) for i in range(4 * job.recheck_every)]
    assert 2 <= len(reads) <= 5  # (a recheck every `recheck_every` calls)
    assert sum(1 for d in drafts if d) == len(reads)  # drafts only where the index was read
    # the requests turn back to the job's template: rechecks score it winning, and it stays on
    for i in range(40 * job.recheck_every):
        call(5000 + i, 902)
        if job.gain >= job.min_gain * job.scores:
            break
    reads.clear()
    for i in range(10):
        call(9000 + i, 902)
    assert len(reads) == 10
