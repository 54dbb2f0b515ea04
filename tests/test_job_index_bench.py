"""bench.job_index: its baseline (the earlier rebuild-on-eviction policy) really re-indexes kept
outputs, the generations index each output once, and both draft about as well."""


def test_rebuilding_baseline_reindexes_and_generations_do_not():
    from bench.job_index import RebuildingJobIndex, _outputs, stream
    from engine.spec.suffix import _JobIndex
    from engine.spec.suffix_index import SuffixIndex
    outputs = _outputs(300, seed=1)  # about 23k tokens against a 4,000-token cap
    counts = {}
    real = SuffixIndex.append_sequence

    def counting(self, seq):
        counts[key] = counts.get(key, 0) + 1
        return real(self, seq)
    SuffixIndex.append_sequence = counting
    try:
        key = "generations"
        now = stream(outputs, _JobIndex, 4000, 8)
        key = "rebuild"
        before = stream(outputs, RebuildingJobIndex, 4000, 8)
    finally:
        SuffixIndex.append_sequence = real
    assert counts["generations"] == len(outputs) - 1  # (the last is queued: no read came after it)
    assert counts["rebuild"] > 2 * len(outputs)
    assert abs(now["tokens_per_step"] - before["tokens_per_step"]) < 0.05 * before["tokens_per_step"]
    assert now["tokens_per_step"] > 1.2  # the template is learned
