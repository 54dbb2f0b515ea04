"""The paged engine against transformers `generate`: same weights, float32, CPU."""
from __future__ import annotations

import functools

import pytest
import torch

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine_helpers import FAMILIES, hf_greedy, mixed_prompts, smollm2_dir, tiny_model_dir


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir())


def run_engine(engine: LLMEngine, prompts, params) -> list:
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            done[out.request_id] = out
    return [done[f"r{i}"] for i in range(len(prompts))]


def tiny_engine(family: str, **kw) -> LLMEngine:
    kw.setdefault("max_num_batched_tokens", 64)  # prompts up to 100 tokens span several chunks
    kw.setdefault("kv_cache_memory", 8 << 20)
    return LLMEngine(tiny_model_dir(family), tokenizer=smollm2_tokenizer(), device="cpu", **kw)


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers(family):
    prompts = mixed_prompts(32, 256, 3, 100, seed=7)
    expected = hf_greedy(tiny_model_dir(family), prompts, GREEDY.max_tokens)
    outs = run_engine(tiny_engine(family), prompts, GREEDY)
    for i, (o, e) in enumerate(zip(outs, expected)):
        assert o.token_ids == e, f"{family} prompt {i} (len {len(prompts[i])})"
        assert o.finish_reason == "length"


def test_greedy_matches_transformers_under_preemption():
    prompts = mixed_prompts(32, 256, 20, 100, seed=3)
    expected = hf_greedy(tiny_model_dir("llama"), prompts, GREEDY.max_tokens)
    # 24 blocks of 16 tokens cannot hold 32 running requests: the scheduler must preempt.
    eng = tiny_engine("llama", num_gpu_blocks_override=24, max_num_batched_tokens=128)
    outs = run_engine(eng, prompts, GREEDY)
    assert eng.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    assert eng.block_manager.num_free_blocks == 24  # nothing leaked


def test_prefix_cache_hits_keep_greedy_output():
    shared = mixed_prompts(1, 256, 70, 70, seed=11)[0]
    prompts = [shared + p for p in mixed_prompts(16, 256, 1, 30, seed=12)] + [shared]
    expected = hf_greedy(tiny_model_dir("qwen3"), prompts, GREEDY.max_tokens)
    eng = tiny_engine("qwen3", max_num_seqs=4)
    outs = run_engine(eng, prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert eng.block_manager.stats.hit_tokens >= 15 * 64
    assert any(o.num_cached_tokens > 0 for o in outs)


def test_smollm2_greedy_matches_transformers():
    tok = smollm2_tokenizer()
    texts = [f"Question {i}: what is {i} plus {i * 3}? Explain step by step." * (1 + i % 4) for i in range(32)]
    prompts = [tok.encode(t) for t in texts]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = hf_greedy(smollm2_dir(), prompts, params.max_tokens)
    eng = LLMEngine("smollm2", device="cpu", max_num_batched_tokens=64, kv_cache_memory=64 << 20)
    outs = run_engine(eng, prompts, params)
    assert [o.token_ids for o in outs] == expected
    assert max(len(p) for p in prompts) > 64  # some prompts span more than one chunk


def test_seeded_request_reproduces_alone_and_in_busy_batch():
    p = mixed_prompts(1, 256, 20, 20, seed=5)[0]
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=42, ignore_eos=True)
    alone = run_engine(tiny_engine("llama"), [p], sp)[0].token_ids
    others = mixed_prompts(15, 256, 5, 60, seed=6)
    noisy = SamplingParams(max_tokens=14, temperature=1.2, ignore_eos=True)
    busy = run_engine(tiny_engine("llama"), others[:7] + [p] + others[7:], [noisy] * 7 + [sp] + [noisy] * 8)
    assert busy[7].token_ids == alone
    assert len(set(tuple(o.token_ids) for o in busy)) > 1


def test_stop_conditions_and_finish_reasons():
    tok = smollm2_tokenizer()
    eng = LLMEngine("smollm2", device="cpu", kv_cache_memory=64 << 20, max_model_len=64)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok.encode(chat)
    long_prompt = list(range(10, 10 + 80))  # beyond max_model_len
    outs = run_engine(eng, [ids, ids, ids, ids, long_prompt, ids[-20:]], [
        SamplingParams(max_tokens=40, temperature=0),  # ends on EOS (<|im_end|>)
        SamplingParams(max_tokens=40, temperature=0, stop=["Paris"]),
        SamplingParams(max_tokens=3, temperature=0),
        SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[ids[-1]] if False else [], ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0),
        SamplingParams(max_tokens=100, temperature=0, ignore_eos=True),
    ])
    eos, stop_str, max_tok, model_len, too_long, short = outs
    assert eos.finish_reason == "stop" and "Paris" in eos.text
    assert stop_str.finish_reason == "stop" and "Paris" not in stop_str.text
    assert stop_str.text and eos.text.startswith(stop_str.text)
    assert max_tok.finish_reason == "length" and len(max_tok.token_ids) == 3
    assert model_len.finish_reason == "length" and len(ids) + len(model_len.token_ids) == 64
    assert too_long.finish_reason == "error" and "max_model_len" in too_long.error
    assert short.finish_reason == "length" and 20 + len(short.token_ids) == 64


def test_stop_token_ids_end_request():
    eng = tiny_engine("llama")
    p = mixed_prompts(1, 256, 10, 10, seed=9)[0]
    first = run_engine(eng, [p], GREEDY)[0].token_ids
    out = run_engine(eng, [p], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[first[2]],
                                              ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids == first[:first.index(first[2]) + 1]


def test_bad_requests_fail_alone():
    eng = tiny_engine("llama")
    good = mixed_prompts(2, 256, 5, 9, seed=1)
    eng.add_request("bad-vocab", [1, 2, 999999], GREEDY)
    eng.add_request("empty", [], GREEDY)
    outs = {}
    for i, p in enumerate(good):
        eng.add_request(f"g{i}", p, GREEDY)
    while eng.has_unfinished():
        outs.update({o.request_id: o for o in eng.step()})
    assert outs["bad-vocab"].finish_reason == "error" and "vocabulary" in outs["bad-vocab"].error
    assert outs["empty"].finish_reason == "error"
    assert all(outs[f"g{i}"].finish_reason == "length" for i in range(2))


def test_logprobs_are_log_softmax_of_chosen_tokens():
    eng = tiny_engine("llama")
    p = mixed_prompts(1, 256, 12, 12, seed=2)[0]
    out = run_engine(eng, [p], SamplingParams(max_tokens=4, temperature=0, logprobs=True, ignore_eos=True))[0]
    assert len(out.logprobs) == 4 and all(lp <= 0 for lp in out.logprobs)
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    with torch.no_grad():
        logits = m(torch.tensor([p + out.token_ids])).logits[0]
    ref = logits.log_softmax(-1)[len(p) - 1:-1].gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(out.logprobs), ref, atol=1e-4)


def test_engine_on_triton_kernels_matches_transformers(monkeypatch):
    """The whole engine on the Triton kernels (interpreted on the CPU), GQA group of 3."""
    monkeypatch.setenv("PREFIXQ_KERNELS", "triton")
    prompts = mixed_prompts(4, 256, 3, 40, seed=7)
    expected = hf_greedy(tiny_model_dir("llama-gqa3-tied"), prompts, 6)
    eng = tiny_engine("llama-gqa3-tied", max_num_batched_tokens=32)
    outs = run_engine(eng, prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected


@pytest.mark.parametrize("family", ["llama-gqa3-tied", "qwen3"])
def test_prefill_chunks_run_as_decode_rows_match_transformers(family):
    """On the GPU a step whose rows fit the largest decode graph runs prefill chunks as one
    row per token through it (an admission mid-run is then a graph replay, not an eager
    step). Forced on here: chunked prompts, prefix hits and async output keep greedy output."""
    shared = mixed_prompts(1, 256, 40, 40, seed=21)[0]
    prompts = mixed_prompts(12, 256, 3, 100, seed=22) + [shared + p for p in mixed_prompts(6, 256, 1, 20, seed=23)]
    expected = hf_greedy(tiny_model_dir(family), prompts, GREEDY.max_tokens)
    eng = tiny_engine(family, max_num_seqs=5, async_scheduling=True)
    eng.runner.max_prefill_rows_as_decode = 256
    calls = []
    real = eng.runner.prepare

    def prepare(*a, **kw):
        inp = real(*a, **kw)
        calls.append(inp.meta.is_decode and int(inp.meta.block_tables.shape[0]) > len(a[0].requests))
        return inp
    eng.runner.prepare = prepare
    outs = run_engine(eng, prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert sum(calls) >= 10  # steps with prefill chunks did run as decode rows
    assert eng.block_manager.stats.hit_tokens > 0


def test_admissions_cut_to_fit_a_decode_graph_match_transformers():
    """Mid-run admissions of long prompts are cut into chunks that fit the (forced) decode
    graph and KV-read limits, so every step with a prefill chunk after the first runs as decode
    rows; greedy output is unchanged."""
    prompts = mixed_prompts(16, 256, 60, 160, seed=31)
    expected = hf_greedy(tiny_model_dir("llama-gqa3-tied"), prompts, GREEDY.max_tokens)
    eng = tiny_engine("llama-gqa3-tied", max_num_seqs=4, async_scheduling=True, max_num_batched_tokens=256)
    eng.runner.max_prefill_rows_as_decode = eng.scheduler.graph_rows = 100
    eng.runner.max_decode_row_reads = eng.scheduler.graph_reads = 12000
    kinds = []
    real = eng.runner.prepare

    def prepare(*a, **kw):
        inp = real(*a, **kw)
        if inp.has_prefill:
            kinds.append((inp.meta.is_decode, sum(a[0].num_tokens)))
        return inp
    eng.runner.prepare = prepare
    outs = run_engine(eng, prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    as_rows = [n for d, n in kinds[1:] if d]
    assert len(as_rows) >= 15 and max(as_rows) <= 100 and all(d for d, _ in kinds[1:])


def test_async_output_matches_transformers_with_preemption_and_stops():
    """The overlapped step (host finishes step n while step n+1 is launched) on the CPU."""
    prompts = mixed_prompts(24, 256, 20, 100, seed=13)
    expected = hf_greedy(tiny_model_dir("qwen2"), prompts, GREEDY.max_tokens)
    eng = tiny_engine("qwen2", num_gpu_blocks_override=20, max_num_batched_tokens=128, async_scheduling=True)
    assert eng.async_output
    outs = run_engine(eng, prompts, GREEDY)
    assert eng.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    assert eng.block_manager.num_free_blocks == 20
    # Stops: a stop token id and max_tokens end requests while their next step is in flight.
    stop_at = expected[0][4]
    outs = run_engine(eng, prompts[:2], [
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_at]),
        SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)])
    assert outs[0].token_ids == expected[0][:expected[0].index(stop_at) + 1]
    assert outs[1].token_ids == expected[1][:5] and outs[1].finish_reason == "length"


def test_smollm2_bf16_error_is_bf16_rounding():
    """In bf16 our logits stray from the fp32 ones no more than transformers' own bf16 logits do
    (SmolLM2's 30 layers drift by ~0.13 on average in either implementation)."""
    from transformers import AutoModelForCausalLM

    from engine.request import Request
    from engine.scheduler import ScheduledBatch
    tok = smollm2_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Write 3 sentences about volcanoes."}],
                                   add_generation_prompt=True, tokenize=False)
    seq = tok.encode(text, add_special_tokens=False) + tok.encode(" Volcanoes are openings in the crust.")
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
        l32 = ref(torch.tensor([seq])).logits[0].float()
        hf16 = ref.to(torch.bfloat16)(torch.tensor([seq])).logits[0].float()
    eng = LLMEngine("smollm2", device="cpu", dtype="bfloat16", kv_cache_memory=32 << 20)
    req = Request("x", seq, SamplingParams(max_tokens=1))
    assert eng.block_manager.allocate_slots(req, len(seq))
    inp = eng.runner.prepare(ScheduledBatch([req], [len(seq)]), None, eng.block_manager.table)
    with torch.inference_mode():
        ours = eng.runner.model.compute_logits(eng.runner.model(inp.input_ids, inp.positions, inp.meta)).float()
    err_ours, err_hf = (ours - l32).abs().mean(), (hf16 - l32).abs().mean()
    assert err_ours <= 1.3 * err_hf, (float(err_ours), float(err_hf))
    assert (ours.argmax(-1) == l32.argmax(-1)).float().mean() >= 0.95


def test_freeze_gc_moves_start_up_objects_out_of_the_collectors_reach():
    """freeze_gc=True (the GPU's default): what exists after start-up is frozen, so a full
    collection later scans only what the engine allocates; off on the CPU by default."""
    import gc
    before = gc.get_freeze_count()
    tiny_engine("llama")
    assert gc.get_freeze_count() == before  # "auto" freezes on the GPU only
    try:
        eng = tiny_engine("llama", freeze_gc=True, speculative_method="ngram")  # (engine <-> spec: a cycle)
        assert gc.get_freeze_count() > before
        import weakref
        runner = weakref.ref(eng.runner)
        del eng
        gc.collect()
        assert runner() is None  # the engine itself was not frozen: its cycles are collected
    finally:
        gc.unfreeze()
