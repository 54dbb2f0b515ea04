"""KV block pool, prefix cache and scheduler rules, without a model."""
from __future__ import annotations

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def admit(bm: BlockManager, r: Request) -> int:
    hits = bm.get_computed_blocks(r)
    r.num_computed_tokens = len(hits) * bm.block_size
    assert bm.allocate_slots(r, r.num_tokens - r.num_computed_tokens, hits)
    bm.record_admission(r, len(hits))
    return len(hits)


def finish_prefill(bm: BlockManager, r: Request) -> None:
    r.num_computed_tokens = r.num_tokens
    bm.cache_full_blocks(r)


def test_free_queue_and_refcounts():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = req("a", list(range(10)))  # 3 blocks
    admit(bm, a)
    assert bm.num_free_blocks == 5 and [b.ref_cnt for b in a.blocks] == [1, 1, 1]
    bm.free(a)
    assert bm.num_free_blocks == 8 and a.blocks == [] and a.block_ids == []


def test_allocation_fails_without_side_effects():
    bm = BlockManager(2, 4)
    a = req("a", list(range(20)))
    assert not bm.allocate_slots(a, 20)
    assert bm.num_free_blocks == 2 and a.blocks == []


def test_prefix_hit_reuses_full_blocks_only_and_leaves_last_token():
    bm = BlockManager(16, 4)
    a = req("a", list(range(10)))
    admit(bm, a)
    finish_prefill(bm, a)
    assert len(bm.cached) == 2  # only the two full blocks are shareable
    b = req("b", list(range(10)) + [99])
    assert admit(bm, b) == 2
    assert b.blocks[:2] == a.blocks[:2] and a.blocks[0].ref_cnt == 2
    # A fully cached prompt still computes its last token.
    c = req("c", list(range(8)))
    assert admit(bm, c) == 1 and c.num_computed_tokens == 4


def test_hit_requires_equal_tokens_and_same_salt():
    bm = BlockManager(16, 4)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, a)
    finish_prefill(bm, a)
    other = req("o", [1, 2, 3, 5, 5, 6, 7, 8, 9])
    assert admit(bm, other) == 0
    salted = req("s", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    salted.cache_salt = "tenant-2"
    assert admit(bm, salted) == 0


def test_eviction_is_lru_and_only_on_reuse():
    bm = BlockManager(4, 4)
    a = req("a", list(range(9)))  # 3 blocks, 2 full
    admit(bm, a)
    finish_prefill(bm, a)
    bm.free(a)
    assert len(bm.cached) == 2  # freed blocks stay cached until popped
    # Freed tail first: the partial block and then block 1 are reused before block 0.
    b = req("b", [50] * 8)  # needs 2 blocks: takes the never-cached one and the free one
    admit(bm, b)
    c = req("c", list(range(5)))
    assert admit(bm, c) == 1  # block 0 survived
    assert bm.stats.queries == 3 and bm.stats.hits == 1


def test_scheduler_budget_chunks_and_order():
    cfg = EngineConfig(model="x", max_num_batched_tokens=32, max_num_seqs=4)
    bm = BlockManager(64, 16)
    s = Scheduler(cfg, bm, max_model_len=1024)
    long = req("long", list(range(100)))
    short = req("short", list(range(10)))
    s.add(long)
    s.add(short)
    batch = s.schedule()
    assert [r.request_id for r in batch.requests] == ["long"] and batch.num_tokens == [32]
    long.num_computed_tokens += 32
    batch = s.schedule()
    assert batch.requests[0] is long  # running first
    assert batch.total_tokens <= 32


def test_scheduler_preempts_newest_when_blocks_run_out():
    cfg = EngineConfig(model="x", max_num_batched_tokens=256, max_num_seqs=8)
    bm = BlockManager(4, 4)
    s = Scheduler(cfg, bm, max_model_len=1024)
    a, b = req("a", list(range(7))), req("b", list(range(100, 107)))
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert len(batch) == 2 and bm.num_free_blocks == 0
    for r in (a, b):
        r.num_computed_tokens = r.num_tokens
        r.output_token_ids.append(1)
        r.output_token_ids.append(2)  # both now need a third block
    batch = s.schedule()
    assert batch.preempted == [b] and batch.requests == [a]
    assert s.waiting[0] is b and b.num_computed_tokens == 0 and b.blocks == []


def test_overlong_prompt_is_rejected_at_admission():
    cfg = EngineConfig(model="x")
    s = Scheduler(cfg, BlockManager(64, 16), max_model_len=16)
    s.add(req("big", list(range(16))))
    s.add(req("ok", list(range(8))))
    batch = s.schedule()
    assert [r.request_id for r in batch.errors] == ["big"] and "max_model_len" in batch.errors[0].error
    assert [r.request_id for r in batch.requests] == ["ok"]


def test_waiting_request_defers_to_a_prefix_computed_this_step():
    """Two requests with the same long prefix: the second waits one step and then hits,
    instead of computing the prefix a second time in the same step."""
    cfg = EngineConfig(model="x", max_num_batched_tokens=256, max_num_seqs=8)
    bm = BlockManager(64, 16)
    s = Scheduler(cfg, bm, max_model_len=1024)
    shared = list(range(64))
    a, b = req("a", shared + [1, 2]), req("b", shared + [3, 4])
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert batch.requests == [a]
    a.num_computed_tokens += batch.num_tokens[0]
    bm.cache_full_blocks(a)  # the engine registers blocks when it launches the step
    batch = s.schedule()
    assert b in batch.requests and b.num_cached_tokens == 64
    assert bm.stats.queries == 2 and bm.stats.hits == 1 and bm.stats.hit_tokens == 64


def test_requests_behind_a_deferred_one_are_still_admitted():
    """Grouped order puts a document's questions together: while the first computes the shared
    document, the others step aside for one step, and the next document starts in the same step."""
    cfg = EngineConfig(model="x", max_num_batched_tokens=512, max_num_seqs=8)
    bm = BlockManager(64, 16)
    s = Scheduler(cfg, bm, max_model_len=1024)
    doc1, doc2 = list(range(64)), list(range(100, 164))
    a1, a2, b1, b2 = (req("a1", doc1 + [1]), req("a2", doc1 + [2]), req("b1", doc2 + [3]), req("b2", doc2 + [4]))
    for r in (a1, a2, b1, b2):
        s.add(r)
    batch = s.schedule()
    assert batch.requests == [a1, b1]
    assert list(s.waiting) == [a2, b2]  # their places are kept
    for r, n in zip(batch.requests, batch.num_tokens):
        r.num_computed_tokens += n
        bm.cache_full_blocks(r)
    batch = s.schedule()
    assert a2 in batch.requests and b2 in batch.requests
    assert a2.num_cached_tokens == 64 and b2.num_cached_tokens == 64


def test_lookups_of_a_waiting_request_are_counted_once():
    cfg = EngineConfig(model="x", max_num_batched_tokens=256, max_num_seqs=8)
    bm = BlockManager(4, 16)
    s = Scheduler(cfg, bm, max_model_len=1024)
    s.add(req("a", list(range(40))))
    s.add(req("b", list(range(100, 140))))
    for _ in range(3):  # b is looked up each step but waits: a holds 3 of the 4 blocks
        batch = s.schedule()
        assert [r.request_id for r in batch.requests] in (["a"], [])
    assert bm.stats.queries == 1


def test_gpu_admission_gathers_until_enough_slots_are_free():
    cfg = EngineConfig(model="x", max_num_batched_tokens=512, max_num_seqs=8)
    s = Scheduler(cfg, BlockManager(64, 16), max_model_len=1024)
    s.min_admission_slots, s.max_admission_wait = 4, 3
    running = [req(f"r{i}", list(range(i, i + 5))) for i in range(7)]
    for r in running:
        s.add(r)
    s.schedule()
    for r in running:  # all decoding now
        r.num_computed_tokens = r.num_tokens
        r.output_token_ids.append(1)
    for i in range(5):
        s.add(req(f"w{i}", list(range(50 + i, 60 + i))))
    # One slot free, 5 waiting: admission waits (pure decode steps) up to max_admission_wait steps.
    waited = [len([r for r in s.schedule().requests if r.request_id.startswith("w")]) for _ in range(4)]
    assert waited == [0, 0, 0, 1]


def _decoding_scheduler(graph_rows: int, graph_reads: int, n_running: int = 2) -> tuple[Scheduler, list]:
    cfg = EngineConfig(model="x", max_num_batched_tokens=2048, max_num_seqs=8)
    s = Scheduler(cfg, BlockManager(256, 16), max_model_len=4096)
    running = [req(f"r{i}", list(range(i, i + 20))) for i in range(n_running)]
    for r in running:
        s.add(r)
    s.schedule()
    for r in running:  # decoding from position 20
        r.num_computed_tokens = r.num_tokens
        r.output_token_ids.append(1)
    s.graph_rows, s.graph_reads = graph_rows, graph_reads
    return s, running


def _reads(start: int, n: int) -> int:
    return n * start + n * (n + 1) // 2


def test_prefill_chunks_are_cut_to_fit_a_decode_graph_while_requests_decode():
    """With requests decoding, an admitted prompt's chunks are cut so the whole step fits the
    largest decode graph (rows) and the KV reads the runner allows; the prompt goes on in the
    next steps. With no request decoding nothing is cut."""
    s, running = _decoding_scheduler(graph_rows=200, graph_reads=60_000)
    s.add(req("w", list(range(1000, 1600))))  # 600 prompt tokens
    done, rows = 0, []
    while done < 600:
        batch = s.schedule()
        w = batch.requests.index(next(r for r in batch.requests if r.request_id == "w"))
        n = batch.num_tokens[w]
        assert batch.total_tokens <= 200
        decode_reads = sum(_reads(r.num_computed_tokens, 1) for r in running)
        assert _reads(done, n) + decode_reads <= 60_000
        rows.append(n)
        batch.requests[w].num_computed_tokens += n
        done += n
    assert len(rows) > 2 and rows[0] == 198  # rows first, then reads bind
    # an idle engine prefills uncut
    cfg = EngineConfig(model="x", max_num_batched_tokens=2048, max_num_seqs=8)
    idle = Scheduler(cfg, BlockManager(256, 16), max_model_len=4096)
    idle.graph_rows, idle.graph_reads = 200, 60_000
    idle.add(req("w", list(range(600))))
    assert idle.schedule().num_tokens == [600]
    # nor a bulk prefill: more prompts waiting than a few graph steps can take
    bulk, _ = _decoding_scheduler(graph_rows=200, graph_reads=60_000)
    for i in range(6):
        bulk.add(req(f"w{i}", list(range(1000 + i, 1300 + i))))
    assert bulk.schedule().num_tokens[2:] == [300] * 6


def test_a_chunk_too_small_to_progress_is_not_cut():
    """Where the room left would allow only a sliver of the prompt, the step runs eagerly with
    the chunk uncut (one eager step beats many tiny graph steps)."""
    s, _ = _decoding_scheduler(graph_rows=40, graph_reads=1_000_000)  # 38 rows free < 64
    s.add(req("w", list(range(1000, 1300))))
    batch = s.schedule()
    assert batch.num_tokens[-1] == 300
    s2, _ = _decoding_scheduler(graph_rows=40, graph_reads=1_000_000)
    s2.add(req("w", list(range(1000, 1030))))  # fits whole
    assert s2.schedule().num_tokens[-1] == 30


def test_token_slice_spans_prompt_output_and_drafts():
    from engine.request import Request
    from engine.sampling_params import SamplingParams
    r = Request("x", [1, 2, 3, 4], SamplingParams())
    r.output_token_ids = [5, 6, 7]
    r.spec_token_ids = [8, 9]
    everything = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    for start in range(len(everything)):
        for end in range(start, len(everything) + 1):
            assert r.token_slice(start, end) == everything[start:end], (start, end)
