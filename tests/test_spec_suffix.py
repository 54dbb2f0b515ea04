"""Suffix proposer index: the bulk build path matches the token-by-token one."""


def test_bulk_indexing_builds_the_same_tables_as_token_by_token():
    import random

    from engine.spec.suffix import SuffixIndex
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

    from engine.spec.suffix import SEP, SuffixIndex, _JobIndex
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
    assert len(job._index) == 0  # nothing indexed until read
    kept = list(job.seqs)
    assert sum(len(s) + 1 for s in kept) <= 600 and kept == seqs[len(seqs) - len(kept):]
    ref = SuffixIndex(32, 4)
    for s in kept:
        ref.append(s + [SEP], index_last=True)
    job.max_per_read = 4
    while job._queued or job._rebuild:
        n = len(job._queued)
        idx = job.index
        assert len(job._queued) == max(0, n - 4) or n == 0
    assert idx.tokens == ref.tokens
    for n in idx.lengths:
        assert norm(idx.tables[n]) == norm(ref.tables[n]), n


def test_a_job_index_leaves_nothing_for_the_garbage_collector_to_scan():
    """Occurrences of repeated n-grams live in tuples of ints, which the collector stops
    tracking: a job index of repetitive outputs (hundreds of thousands of repeated n-grams in
    a real job) adds no work to a full collection. As lists they made every full collection
    a 300 ms stall of whichever step it fell in."""
    import gc
    import random

    from engine.spec.suffix import SuffixIndex
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
