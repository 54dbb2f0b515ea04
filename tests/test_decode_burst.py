"""Decode bursts (num_scheduler_steps > 1): several decode steps per host step, each fed by
the one before on the device. Output must equal one step at a time, token for token, with
stops mid-burst, overlapped steps, preemption, prefix caching and seeded sampling."""
from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from tests.engine_helpers import mixed_prompts
from tests.test_engine_correctness import run_engine, tiny_engine


def _both(prompts, params, **kw):
    plain = run_engine(tiny_engine("llama", **kw), prompts, params)
    eng = tiny_engine("llama", num_scheduler_steps=4, **kw)
    burst = run_engine(eng, prompts, params)
    return plain, burst, eng


@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_output_is_unchanged_with_stops_inside_bursts(overlap):
    prompts = mixed_prompts(12, 256, 3, 90, seed=21)
    # 37 is not a multiple of 4, and stop tokens end requests in the middle of bursts.
    plain, burst, eng = _both(prompts, SamplingParams(max_tokens=37, temperature=0), async_scheduling=overlap)
    assert [o.token_ids for o in burst] == [o.token_ids for o in plain]
    assert [o.finish_reason for o in burst] == [o.finish_reason for o in plain]
    assert eng.counters["burst_steps"] > 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_stop_token_mid_burst_drops_the_tokens_after_it():
    prompts = mixed_prompts(2, 256, 20, 30, seed=4)
    ref = run_engine(tiny_engine("llama"), prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    stop_at = ref[0].token_ids[5]  # the sixth token: inside the second burst of four
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[stop_at])
    out = run_engine(tiny_engine("llama", num_scheduler_steps=4, async_scheduling=True), prompts, sp)
    assert out[0].token_ids == ref[0].token_ids[:ref[0].token_ids.index(stop_at) + 1]
    assert out[0].finish_reason == "stop"


def test_bursts_under_preemption_and_a_small_pool():
    """A pool too small for every request's burst: bursts fall back to single steps where the
    blocks run out, the scheduler preempts, and every block comes back."""
    prompts = mixed_prompts(24, 256, 20, 100, seed=13)
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    kw = dict(num_gpu_blocks_override=24, max_num_batched_tokens=128, async_scheduling=True)
    plain, burst, eng = _both(prompts, sp, **kw)
    assert eng.scheduler.num_preemptions > 0 and eng.counters["burst_steps"] > 0
    assert [o.token_ids for o in burst] == [o.token_ids for o in plain]
    assert eng.block_manager.num_free_blocks == 24


def test_bursts_keep_prefix_cache_hits_and_output():
    shared = mixed_prompts(1, 256, 70, 70, seed=11)[0]
    prompts = [shared + p for p in mixed_prompts(16, 256, 1, 30, seed=12)]
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain, burst, eng = _both(prompts, sp, max_num_seqs=4)
    assert [o.token_ids for o in burst] == [o.token_ids for o in plain]
    assert eng.counters["burst_steps"] > 0 and eng.block_manager.stats.hit_tokens > 0
    # Blocks completed inside a burst are cached under the right tokens: a repeat is all hits.
    again = run_engine(eng, prompts[:1], sp)
    assert again[0].token_ids == plain[0].token_ids and again[0].num_cached_tokens >= 64


def test_seeded_sampling_is_unchanged_by_bursts():
    """A seeded request's noise follows its output position, also in a burst's later steps;
    unseeded requests share the engine's generator and simply sample."""
    prompts = mixed_prompts(6, 256, 10, 40, seed=5)
    seeded = SamplingParams(max_tokens=18, temperature=0.9, top_p=0.95, seed=42, ignore_eos=True)
    free = SamplingParams(max_tokens=18, temperature=1.0, ignore_eos=True)
    params = [seeded if i % 2 == 0 else free for i in range(6)]
    plain, burst, eng = _both(prompts, params, async_scheduling=True)
    assert eng.counters["burst_steps"] > 0
    for i in range(0, 6, 2):
        assert burst[i].token_ids == plain[i].token_ids
    assert all(len(o.token_ids) == 18 for o in burst)


def test_logprobs_requests_and_speculation_run_one_step_at_a_time():
    prompts = mixed_prompts(3, 256, 10, 20, seed=8)
    eng = tiny_engine("llama", num_scheduler_steps=4)
    out = run_engine(eng, prompts, SamplingParams(max_tokens=9, temperature=0, logprobs=True))
    assert eng.counters["burst_steps"] == 0 and all(len(o.logprobs) == len(o.token_ids) for o in out)
    spec = tiny_engine("llama", num_scheduler_steps=4, speculative_method="ngram", num_speculative_tokens=2)
    run_engine(spec, prompts, SamplingParams(max_tokens=9, temperature=0))
    assert spec.counters["burst_steps"] == 0


def test_num_scheduler_steps_is_validated():
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        tiny_engine("llama", num_scheduler_steps=0)


def test_bursts_with_shared_prefix_attention():
    """Cascade attention in a burst: the plan's shared prefixes hold, each row's suffix grows
    by one per step on the device."""
    shared = mixed_prompts(1, 256, 48, 48, seed=31)[0]
    prompts = [shared + p for p in mixed_prompts(10, 256, 2, 40, seed=32)]
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain, burst, eng = _both(prompts, sp, cascade_attention=True, async_scheduling=True)
    assert eng.counters["burst_steps"] > 0 and eng.runner.cascade_steps > 0
    assert [o.token_ids for o in burst] == [o.token_ids for o in plain]


def test_step_log_has_one_entry_per_forward():
    """Benchmarks read per-step times from the step log: a burst logs each of its forwards."""
    prompts = mixed_prompts(4, 256, 5, 20, seed=2)
    eng = tiny_engine("llama", num_scheduler_steps=4)
    eng.step_log = []
    run_engine(eng, prompts, SamplingParams(max_tokens=13, temperature=0, ignore_eos=True))
    assert eng.counters["burst_steps"] > 0
    assert len(eng.step_log) == eng.counters["steps"] + eng.counters["burst_steps"]


def test_aborting_a_request_while_its_burst_is_in_flight():
    """A cancelled job aborts its rows at any time, also while their burst runs on the device:
    the others' output is unchanged and every block comes back."""
    prompts = mixed_prompts(6, 256, 10, 40, seed=17)
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ref = run_engine(tiny_engine("llama"), prompts, sp)
    eng = tiny_engine("llama", num_scheduler_steps=4, async_scheduling=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, sp)
    done = {}
    while eng.counters["burst_steps"] == 0:
        done.update({o.request_id: o for o in eng.step()})
    assert eng._inflight is not None and eng._inflight.burst > 1
    eng.abort("r2")
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step()})
    assert "r2" not in done or done["r2"].finish_reason == "abort"
    assert [done[f"r{i}"].token_ids for i in range(6) if i != 2] == [ref[i].token_ids for i in range(6) if i != 2]
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
