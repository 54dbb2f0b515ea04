"""Shared-prefix (cascade) decode: grouping rows by shared blocks, the Triton kernel on
planned layouts, and the engine's output with cascade attention on."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cascade_plan import CascadePlanner, plan_cascade
from engine.sampling_params import SamplingParams
from tests.engine_helpers import mixed_prompts
from tests.test_engine_correctness import run_engine, tiny_engine

BS = 16


def trie_tables(rng: np.random.Generator, n_rows: int, width: int, branch: int, next_id: list[int]):
    """Block tables that share prefixes the way prefix caching makes them: rows pick a path
    in a random trie of blocks, then end in private blocks."""
    tables = np.zeros((n_rows, width), dtype=np.int32)
    ctx = np.zeros(n_rows, dtype=np.int64)
    children: dict[tuple, list[int]] = {}
    for r in range(n_rows):
        path: tuple = ()
        depth = int(rng.integers(0, width))
        for d in range(depth):
            kids = children.setdefault(path, [])
            if len(kids) < branch and (not kids or rng.random() < 0.3):
                kids.append(next_id[0])
                next_id[0] += 1
            blk = kids[int(rng.integers(0, len(kids)))]
            tables[r, d] = blk
            path = path + (blk,)
        nblk = int(rng.integers(depth + 1, width + 1))
        for d in range(depth, nblk):
            tables[r, d] = next_id[0]
            next_id[0] += 1
        ctx[r] = (nblk - 1) * BS + int(rng.integers(1, BS + 1))
    return tables, ctx


def check_plan(tables: np.ndarray, ctx: np.ndarray, plan) -> None:
    B, G = len(ctx), len(plan.prefix_lens)
    assert sorted(plan.order.tolist()) == list(range(B))  # every row exactly once
    assert plan.group_cu[0] == 0 and plan.group_cu[-1] == B and (np.diff(plan.group_cu) >= 0).all()
    assert plan.prefix_lens[G - 1] == 0  # the last group holds rows that share nothing
    saved = 0
    for g in range(G):
        rows = plan.order[plan.group_cu[g]:plan.group_cu[g + 1]]
        n = plan.prefix_lens[g] // BS
        assert plan.prefix_lens[g] % BS == 0
        if n:
            assert len(rows) >= 2
            saved += (len(rows) - 1) * n * BS
        for r in rows:
            assert (tables[r, :n] == plan.prefix_tables[g, :n]).all()
            assert plan.suffix_lens[r] >= 1 and plan.suffix_lens[r] + n * BS == ctx[r]
            used = -(-int(plan.suffix_lens[r]) // BS)
            assert (plan.suffix_tables[r, :used] == tables[r, n:n + used]).all()
    assert saved == plan.saved_tokens


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(2, 40), st.integers(2, 9), st.integers(1, 4))
def test_plan_covers_every_row_and_reproduces_its_table(seed, n_rows, width, branch):
    rng = np.random.default_rng(seed)
    tables, ctx = trie_tables(rng, n_rows, width, branch, [1])
    plan = plan_cascade(tables, ctx, BS, max_groups=4, min_saved_fraction=0.0)
    if plan is not None:
        check_plan(tables, ctx, plan)
        assert plan.num_groups <= 4


def grow(tables: np.ndarray, ctx: np.ndarray, steps: int, next_id: list[int]):
    """Decode `steps` tokens in every row: a new private block whenever a row's last one fills."""
    tables, ctx = tables.copy(), ctx.copy()
    for _ in range(steps):
        for r in range(len(ctx)):
            if ctx[r] % BS == 0:
                col = ctx[r] // BS
                if col >= tables.shape[1]:
                    tables = np.pad(tables, ((0, 0), (0, 1)))
                tables[r, col] = next_id[0]
                next_id[0] += 1
            ctx[r] += 1
    return tables, ctx


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(2, 40), st.integers(2, 9), st.integers(1, 4))
def test_planner_reuses_groups_only_while_they_hold(seed, n_rows, width, branch):
    rng = np.random.default_rng(seed)
    ids = [1]
    tables, ctx = trie_tables(rng, n_rows, width, branch, ids)
    reqs = [object() for _ in range(n_rows)]
    planner = CascadePlanner(BS, max_groups=4, min_saved_fraction=0.0)
    first = planner.plan(reqs, tables, ctx)
    for step in range(3):
        tables, ctx = grow(tables, ctx, int(rng.integers(1, 20)), ids)
        plan = planner.plan(reqs, tables, ctx)
        assert (plan is None) == (first is None)
        if plan is not None:
            check_plan(tables, ctx, plan)  # remembered groups, still a correct layout
    if first is not None:
        assert planner.reused == 3
        # A row that lost its blocks and got others: the groups are found again.
        moved = tables.copy()
        moved[int(first.order[0]), 0] = ids[0]
        plan = planner.plan(reqs, moved, ctx)
        assert planner.reused == 3
        if plan is not None:
            check_plan(moved, ctx, plan)
        # Another batch (other requests): found again too.
        planner.plan([object() for _ in range(n_rows)], tables, ctx)
        assert planner.reused == 3


def test_plan_prefers_nested_groups_when_they_save_more():
    # 8 rows share block 1; two halves then share 6 more blocks each: two groups of 4 over
    # 7 blocks save 2 * 3 * 7 = 42 blocks, one group over block 1 only 7.
    t = np.zeros((8, 10), dtype=np.int32)
    t[:, 0] = 1
    t[:4, 1:7] = np.arange(10, 16)
    t[4:, 1:7] = np.arange(20, 26)
    t[:, 7] = np.arange(100, 108)
    ctx = np.full(8, 7 * BS + 5)
    plan = plan_cascade(t, ctx, BS, min_saved_fraction=0.0)
    assert plan.num_groups == 2 and sorted(plan.prefix_lens[:2].tolist()) == [7 * BS, 7 * BS]
    check_plan(t, ctx, plan)


def test_no_plan_without_sharing_or_below_the_threshold():
    t = np.arange(40, dtype=np.int32).reshape(8, 5)
    assert plan_cascade(t, np.full(8, 70), BS) is None
    t[:2, 0] = 999  # two rows share one block of 70 tokens each: 16 of 560 tokens saved
    assert plan_cascade(t, np.full(8, 70), BS) is None
    assert plan_cascade(t, np.full(8, 70), BS, min_saved_fraction=0.0).num_groups == 1


@pytest.mark.parametrize("hq,hkv", [(4, 2), (9, 3)])
def test_triton_cascade_on_planned_layout_matches_plain_decode(hq, hkv):
    from kernels.cascade_attention import cascade_decode_attention_lse
    from kernels.decode_attention import paged_decode_attention_lse_ref
    rng = np.random.default_rng(hq)
    next_id = [0]
    tables, ctx = trie_tables(rng, 24, 6, 2, next_id)
    plan = plan_cascade(tables, ctx, BS, max_groups=5, min_saved_fraction=0.0)
    assert plan is not None and plan.num_groups >= 1
    g = torch.Generator().manual_seed(1)
    k = torch.randn(next_id[0], BS, hkv, 64, generator=g)
    v = torch.randn(next_id[0], BS, hkv, 64, generator=g)
    q = torch.randn(len(ctx), hq, 64, generator=g)
    t = {name: torch.from_numpy(getattr(plan, name)) for name in
         ("prefix_tables", "prefix_lens", "group_cu", "order", "suffix_tables", "suffix_lens")}
    out, lse = cascade_decode_attention_lse(q, k, v, t["prefix_tables"], t["prefix_lens"], t["group_cu"], t["order"],
                                            t["suffix_tables"], t["suffix_lens"], 0.125, block_m=16)
    ref, ref_lse = paged_decode_attention_lse_ref(q, k, v, torch.from_numpy(tables),
                                                  torch.from_numpy(ctx).to(torch.int32), 0.125)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", [None, "ngram"])
def test_engine_output_unchanged_by_cascade_attention(spec):
    """Requests sharing prompt prefixes (nested: one system prompt, then two documents) give
    the same greedy tokens with cascade attention as without, with and without speculation."""
    system = mixed_prompts(1, 256, 48, 48, seed=1)[0]
    docs = mixed_prompts(2, 256, 40, 40, seed=2)
    questions = mixed_prompts(12, 256, 3, 9, seed=3)
    prompts = [system + docs[i % 2] + q for i, q in enumerate(questions)]
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    kw = dict(max_num_batched_tokens=512, speculative_method=spec, adaptive_speculation=False)
    plain = run_engine(tiny_engine("llama-gqa3-tied", cascade_attention=False, **kw), prompts, sp)
    eng = tiny_engine("llama-gqa3-tied", cascade_attention=True, **kw)
    casc = run_engine(eng, prompts, sp)
    assert [o.token_ids for o in casc] == [o.token_ids for o in plain]
    assert eng.runner.cascade_steps > 0


def test_auto_cascade_is_off_on_the_cpu_and_forced_on_by_true():
    eng = tiny_engine("llama")
    assert eng.runner.cascade_min_rows is None
    assert tiny_engine("llama", cascade_attention=True).runner.cascade_min_rows == 2

