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
