"""bench.spec_host_cost: the worker times the speculation machinery of a speculating engine (and
nothing for a plain one), over whole steps of a real job on the tiny random model."""


def test_worker_times_speculation_calls_only_when_speculating():
    from bench.spec_host_cost import _job, worker
    prompts, lengths = _job(0, 16)
    assert all(16 <= n <= 96 for n in lengths) and all(len(p) >= 150 for p in prompts)
    off = worker(None, 16, 1, 0)
    ngram = worker("ngram", 16, 1, 0)
    assert off["spec_host_ms_per_step"] == 0 and off["steps"] >= max(lengths)
    assert ngram["spec_host_ms_per_step"] > 0 and ngram["steps"] > 0
