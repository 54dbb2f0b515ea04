"""Small per-step kernels around speculative decoding with overlapped steps.

`patch_step_inputs`: the host builds step n+1's inputs before step n's tokens reach it. Step
n's newest token per request (and, after verification, how many drafts it accepted) live on
the device; this one launch copies those tokens into the input ids and shifts the positions,
KV slots, context lengths and sampling positions of the requests whose drafts were accepted.
Done as separate torch ops it was a dozen launches per step, on a host that sets the pace.

`greedy_accept`: greedy verification of drafts: accepted = leading drafts equal to the target's
argmax; emits the argmax row (the accepted drafts, then the bonus or corrected token).
"""
import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T", "R", "S", "MB"])  # they change every step: no recompiles
def _patch_kernel(ids_ptr, pos_ptr, slot_ptr, ctx_ptr, samp_ptr, table_ptr, prev_tok_ptr, prev_off_ptr,
                  tok_gather_ptr, tok_shift_ptr, tok_row_ptr, ctx_shift_ptr, samp_shift_ptr,
                  T, R, S, MB, BS: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mt = offs < T
    g = tl.load(tok_gather_ptr + offs, mask=mt, other=-1)
    tok = tl.load(prev_tok_ptr + g, mask=g >= 0, other=0)
    tl.store(ids_ptr + offs, tok, mask=g >= 0)
    if SHIFT:
        src = tl.load(tok_shift_ptr + offs, mask=mt, other=-1)
        sh = src >= 0
        off = tl.load(prev_off_ptr + src, mask=sh, other=0)
        p = tl.load(pos_ptr + offs, mask=sh, other=0) + off
        row = tl.load(tok_row_ptr + offs, mask=sh, other=0)
        blk = tl.load(table_ptr + row * MB + p // BS, mask=sh, other=0)
        tl.store(pos_ptr + offs, p, mask=sh)
        tl.store(slot_ptr + offs, blk * BS + p % BS, mask=sh)
        csrc = tl.load(ctx_shift_ptr + offs, mask=offs < R, other=-1)
        coff = tl.load(prev_off_ptr + csrc, mask=csrc >= 0, other=0)
        c = tl.load(ctx_ptr + offs, mask=csrc >= 0, other=0)
        tl.store(ctx_ptr + offs, c + coff, mask=csrc >= 0)
        ms = offs < S
        ssrc = tl.load(samp_shift_ptr + offs, mask=ms, other=-1)
        soff = tl.load(prev_off_ptr + ssrc, mask=ssrc >= 0, other=0)
        tl.store(samp_ptr + offs, soff, mask=ms)


def patch_step_inputs(input_ids, positions, slots, ctx, samp_off, table, block_size, prev_tokens, prev_offsets,
                      tok_gather, tok_shift=None, tok_row=None, ctx_shift=None, samp_shift=None):
    """In place. int64 tensors: input_ids/positions/slots/tok_gather/tok_shift/tok_row [T],
    ctx/ctx_shift [R], samp_off/samp_shift [S], table [rows, MB]; prev_tokens/prev_offsets
    indexed by the *_gather/*_shift entries (-1: leave as is; samp_off gets 0). Without
    prev_offsets only the input ids are patched."""
    T, R = input_ids.shape[0], ctx.shape[0]
    shift = prev_offsets is not None
    S = samp_off.shape[0] if shift else 0
    n = max(T, R, S)
    if n == 0:
        return
    BLOCK = 128
    dummy = tok_gather
    _patch_kernel[(triton.cdiv(n, BLOCK),)](
        input_ids, positions, slots, ctx, samp_off if shift else dummy, table, prev_tokens,
        prev_offsets if shift else prev_tokens, tok_gather, tok_shift if shift else dummy,
        tok_row if shift else dummy, ctx_shift if shift else dummy, samp_shift if shift else dummy,
        T, R, S, table.shape[1], BS=block_size, SHIFT=shift, BLOCK=BLOCK)


def patch_step_inputs_ref(input_ids, positions, slots, ctx, samp_off, table, block_size, prev_tokens, prev_offsets,
                          tok_gather, tok_shift=None, tok_row=None, ctx_shift=None, samp_shift=None):
    g = tok_gather >= 0
    input_ids[g] = prev_tokens[tok_gather[g]]
    if prev_offsets is None:
        return
    s = tok_shift >= 0
    p = positions[s] + prev_offsets[tok_shift[s]]
    positions[s] = p
    slots[s] = table[tok_row[s], p // block_size].to(torch.int64) * block_size + p % block_size
    c = ctx_shift >= 0
    ctx[c] += prev_offsets[ctx_shift[c]]
    samp_off.copy_(torch.where(samp_shift >= 0, prev_offsets[samp_shift.clamp(min=0)], torch.zeros_like(samp_shift)))


@triton.jit(do_not_specialize=["K"])
def _accept_kernel(top_ptr, rows_ptr, drafts_ptr, packed_ptr, last_ptr, acc_ptr, K, K1P: tl.constexpr):
    i = tl.program_id(0)
    offs = tl.arange(0, K1P)
    m = offs < K + 1
    rows = tl.load(rows_ptr + i * (K + 1) + offs, mask=m, other=0)
    t = tl.load(top_ptr + rows, mask=m, other=0)
    d = tl.load(drafts_ptr + i * K + offs, mask=offs < K, other=-1)
    miss = (offs < K) & (t != d)
    acc = tl.min(tl.where(miss | (offs >= K), offs, K + 1), axis=0)  # first miss, or K
    last = tl.sum(tl.where(offs == acc, t, 0), axis=0)
    tl.store(packed_ptr + i * (K + 2) + offs, t, mask=m)
    tl.store(packed_ptr + i * (K + 2) + K + 1, acc)
    tl.store(last_ptr + i, last)
    tl.store(acc_ptr + i, acc)


def greedy_accept(top, rows, drafts):
    """top [num scored rows] int64 (the target's argmax per row); rows [N, K+1] int64 (each
    request's scored rows, padding repeats its last); drafts [N, K] int64 padded with -1.
    Returns (last [N], accepted [N], packed [N, K+2]: the emitted row, then accepted)."""
    N, K1 = rows.shape
    K = K1 - 1
    packed = torch.empty(N, K + 2, dtype=torch.int64, device=top.device)
    last = torch.empty(N, dtype=torch.int64, device=top.device)
    acc = torch.empty(N, dtype=torch.int64, device=top.device)
    if N:
        _accept_kernel[(N,)](top, rows, drafts, packed, last, acc, K, K1P=max(2, triton.next_power_of_2(K1)))
    return last, acc, packed


def greedy_accept_ref(top, rows, drafts):
    K = rows.shape[1] - 1
    emitted = top[rows]
    acc = (emitted[:, :K] == drafts).long().cumprod(1).sum(1)
    last = emitted.gather(1, acc[:, None]).squeeze(1)
    return last, acc, torch.cat([emitted, acc[:, None]], dim=1)


def warm_up(device: torch.device, max_k: int) -> None:
    """Compile every variant the engine can meet (with and without shifts; each power of two
    of k + 1), so no step pays for a compile while a job runs."""
    z = lambda n: torch.zeros(n, dtype=torch.int64, device=device)  # noqa: E731
    m = lambda n: torch.full((n,), -1, dtype=torch.int64, device=device)  # noqa: E731
    table = torch.zeros(2, 2, dtype=torch.int64, device=device)
    patch_step_inputs(z(3), z(3), z(3), z(2), None, table, 16, z(2), None, m(3))
    patch_step_inputs(z(3), z(3), z(3), z(2), z(2), table, 16, z(2), z(2), m(3), m(3), z(3), m(2), m(2))
    k = 1
    while max_k > 0:
        greedy_accept(z(4), torch.zeros(1, k + 1, dtype=torch.int64, device=device), m(k).view(1, k))
        if k >= max_k:
            break
        k = min(max_k, 2 * k + 1)
