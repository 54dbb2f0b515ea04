"""The per-step kernels around overlapped speculation match their torch references."""
import pytest
import torch

from kernels.step_inputs import greedy_accept, greedy_accept_ref, patch_step_inputs, patch_step_inputs_ref


def _case(seed: int, decode_layout: bool):
    g = torch.Generator().manual_seed(seed)
    bs, mb, n_prev = 16, 6, 5
    reqs = [int(x) for x in torch.randint(1, 6, (7,), generator=g)]  # tokens per request
    T = sum(reqs)
    rows = T if decode_layout else len(reqs)
    table = torch.randint(0, 50, (rows, mb), generator=g)
    ids = torch.randint(0, 1000, (T,), generator=g)
    pos = torch.randint(0, 40, (T,), generator=g)
    slots = torch.randint(0, 800, (T,), generator=g)
    ctx = torch.randint(1, 48, (rows,), generator=g)
    prev_tokens = torch.randint(0, 1000, (n_prev,), generator=g)
    prev_offsets = torch.randint(0, 5, (n_prev,), generator=g)
    gather, shift = torch.full((T,), -1), torch.full((T,), -1)
    tok_row = torch.arange(T) if decode_layout else torch.repeat_interleave(torch.arange(len(reqs)), torch.tensor(reqs))
    ctx_shift = torch.full((rows,), -1)
    c0 = 0
    for i, n in enumerate(reqs):
        if i % 3 != 2:  # a request with a token in flight: its first token is gathered, all shifted
            src = i % n_prev
            gather[c0] = src
            shift[c0:c0 + n] = src
            if decode_layout:
                ctx_shift[c0:c0 + n] = src
            else:
                ctx_shift[i] = src
        c0 += n
    samp_shift = torch.tensor([i % n_prev if i % 3 != 2 else -1 for i in range(len(reqs))])
    return dict(ids=ids, pos=pos, slots=slots, ctx=ctx, table=table, bs=bs, prev_tokens=prev_tokens,
                prev_offsets=prev_offsets, gather=gather, shift=shift, tok_row=tok_row, ctx_shift=ctx_shift,
                samp_shift=samp_shift)


@pytest.mark.parametrize("decode_layout", [True, False])
@pytest.mark.parametrize("with_shift", [True, False])
def test_patch_step_inputs_matches_reference(decode_layout, with_shift):
    c = _case(3, decode_layout)
    outs = []
    for fn in (patch_step_inputs, patch_step_inputs_ref):
        ids, pos, slots, ctx = c["ids"].clone(), c["pos"].clone(), c["slots"].clone(), c["ctx"].clone()
        samp = torch.full((len(c["samp_shift"]),), 99, dtype=torch.int64)
        if with_shift:
            fn(ids, pos, slots, ctx, samp, c["table"], c["bs"], c["prev_tokens"], c["prev_offsets"], c["gather"],
               c["shift"], c["tok_row"], c["ctx_shift"], c["samp_shift"])
        else:
            fn(ids, pos, slots, ctx, None, c["table"], c["bs"], c["prev_tokens"], None, c["gather"])
        outs.append((ids, pos, slots, ctx, samp))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    ids, pos, slots, ctx, samp = outs[1]
    g = c["gather"] >= 0
    assert torch.equal(ids[g], c["prev_tokens"][c["gather"][g]]) and torch.equal(ids[~g], c["ids"][~g])
    if with_shift:
        s = c["shift"] >= 0
        assert torch.equal(pos[s], c["pos"][s] + c["prev_offsets"][c["shift"][s]])
        assert torch.equal(slots[~s], c["slots"][~s])
        assert (samp[c["samp_shift"] < 0] == 0).all()
    else:
        assert torch.equal(pos, c["pos"]) and torch.equal(slots, c["slots"])


def test_greedy_accept_matches_reference():
    g = torch.Generator().manual_seed(4)
    K = 4
    top = torch.randint(0, 6, (40,), generator=g)
    counts = [5, 1, 3, 5, 5, 2]  # scored rows per request (1 + drafts)
    rows, drafts, r0 = [], [], 0
    for j, n in enumerate(counts):
        rows.append([r0 + min(i, n - 1) for i in range(K + 1)])
        d = top[r0:r0 + n - 1].tolist()
        if j == 3:
            d[1] = (d[1] + 1) % 6  # rejected at the second draft
        if j == 4:
            d[0] = (d[0] + 1) % 6  # rejected at once
        drafts.append(d + [-1] * (K - len(d)))
        r0 += n
    rows, drafts = torch.tensor(rows), torch.tensor(drafts)
    got, want = greedy_accept(top, rows, drafts), greedy_accept_ref(top, rows, drafts)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got[1].tolist() == [4, 0, 2, 1, 0, 1]
