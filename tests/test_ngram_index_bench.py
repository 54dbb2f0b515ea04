"""bench.ngram_index_cost: hashed n-gram keys leave nothing for the garbage collector, where the
tuple-keyed index of the baseline revision set off collections every few steps; both draft the
same (the proposals are compared)."""
import random


def test_hashed_keys_set_off_no_collections_and_draft_like_tuples(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    from bench.ngram_index_cost import _prompts, main
    from bench.suffix_index_cost import load_revision
    from engine.spec.ngram import NgramProposer
    out = main(["--batch", "64", "--prompt-tokens", "200", "--steps", "16", "--baseline-rev", "24e133b"])
    assert out["baseline"]["gc_gen0"] >= 3 and out["figures"]["gc_gen0"] <= 1
    assert (tmp_path / "ngram-index-cost-cpu.json").exists()
    tuples = load_revision("24e133b", ("engine/spec/ngram.py",)).NgramProposer(2, 4)
    hashed = NgramProposer(2, 4)
    rng = random.Random(2)
    for i, p in enumerate(_prompts(3, 8, 300)):
        for cut in (100, 101, 180, 300):
            h = p[:cut] + [rng.choice(p[:cut])]
            assert hashed.propose([str(i)], [h], [8]) == tuples.propose([str(i)], [h], [8])
