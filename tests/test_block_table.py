"""The block manager's block-id matrix stays equal to every request's own block list."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine.block_manager import BlockManager
from engine.block_table import BlockTable
from engine.pinned_upload import PinnedUpload
from engine.request import Request
from engine.sampling_params import SamplingParams


def rows_from_lists(reqs: list[Request], width: int) -> np.ndarray:
    t = np.zeros((len(reqs), width), dtype=np.int32)
    for i, r in enumerate(reqs):
        t[i, :len(r.block_ids)] = r.block_ids
    return t


@pytest.mark.parametrize("seed", range(5))
def test_matrix_matches_block_lists_through_random_allocation_and_frees(seed):
    rng = random.Random(seed)
    # Small start sizes so rows and columns both have to grow.
    bm = BlockManager(400, 4)
    bm.table = BlockTable(rows=2, cols=2)
    live: list[Request] = []
    for step in range(300):
        op = rng.random()
        if op < 0.4 or not live:
            shared = [1, 2, 3, 4, 5, 6, 7, 8] if rng.random() < 0.5 else []
            r = Request(f"r{step}", shared + [rng.randrange(10, 99) for _ in range(rng.randint(1, 30))],
                        SamplingParams(max_tokens=4))
            hits = bm.get_computed_blocks(r)
            r.num_computed_tokens = len(hits) * bm.block_size
            if bm.allocate_slots(r, r.num_tokens - r.num_computed_tokens, hits):
                r.num_computed_tokens = r.num_tokens
                bm.cache_full_blocks(r)
                live.append(r)
        elif op < 0.8:
            r = rng.choice(live)  # decode a few tokens
            n = rng.randint(1, 9)
            if bm.allocate_slots(r, n):
                r.output_token_ids.extend(rng.randrange(10, 99) for _ in range(n))
                r.num_computed_tokens += n
        else:
            r = live.pop(rng.randrange(len(live)))
            bm.free(r)
            assert r.table_row == -1
        if live:
            width = max(len(r.block_ids) for r in live)
            assert np.array_equal(bm.table.gather(live, width), rows_from_lists(live, width))
            assert len({r.table_row for r in live}) == len(live)  # one row each


def test_released_row_reads_as_the_new_request_alone():
    t = BlockTable(rows=1, cols=4)
    a = Request("a", [1], SamplingParams())
    t.write(a, 0, [5, 6, 7])
    t.release(a, 3)
    b = Request("b", [1], SamplingParams())
    t.write(b, 0, [9])
    assert b.table_row == 0 and t.gather([b], 3).tolist() == [[9, 0, 0]]


def test_pinned_upload_round_trips_on_cpu():
    up = PinnedUpload(torch.device("cpu"))
    for n in (3, 40000, 7):
        buf = up.stage(n)
        buf[:] = np.arange(n)
        assert up.send(n).tolist() == list(range(n))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pinned_upload_slots_are_not_overwritten_while_copies_run():
    up = PinnedUpload(torch.device("cuda"), slots=2)
    outs = []
    for k in range(6):
        n = 1000 * (k + 1)
        buf = up.stage(n)
        buf[:] = k
        outs.append((k, up.send(n)))
    torch.cuda.synchronize()
    for k, t in outs:
        assert bool((t == k).all())
