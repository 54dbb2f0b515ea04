"""Paged prefill/extend attention over ragged batches, in one launch.

Sequence b has q_len = cu[b+1]-cu[b] new tokens: the last q_len of its
context_lens[b] cached tokens (K/V are already written). Query i sits at
position ctx - q_len + i and attends causally to positions <= its own.

Grid: (q tile, kv head). A tile holds BLOCK_Q tokens x GROUP query heads as
BLOCK_M rows, so each KV tile is loaded once for the whole GQA group. Tiles of
all sequences are packed into one grid dimension (tile start of sequence b is
cu[b] // BLOCK_Q + b) and each program finds its sequence by binary search,
so no host sync is needed to size the grid.
"""
import torch
import triton
import triton.language as tl

from kernels._attn_core import LOG2E, attn_loop, check_cache, finish, use_lowp_dot
from kernels.decode_attention import gather_kv


@triton.jit(do_not_specialize=["num_seqs", "s_btb"])  # they change every step: no recompiles
def _extend_kernel(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, cu_ptr, ctx_ptr, num_seqs,
                   s_qt, s_qh, s_ot, s_oh, s_btb, stride_b, stride_s, stride_h, qk_scale,
                   GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, LOWP: tl.constexpr):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    # Largest b with cu[b] // BLOCK_Q + b <= t.
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(cu_ptr + mid) // BLOCK_Q + mid <= t:
            lo = mid
        else:
            hi = mid - 1
    b = lo
    q_begin = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_begin
    q0 = (t - (q_begin // BLOCK_Q + b)) * BLOCK_Q
    if q0 >= q_len:
        return
    ctx = tl.load(ctx_ptr + b)

    offs_m = tl.arange(0, BLOCK_M)
    tok = offs_m // GROUP
    head = kvh * GROUP + offs_m % GROUP
    rvalid = (tok < BLOCK_Q) & (q0 + tok < q_len)
    rows = q_begin + q0 + tok
    offs_d = tl.arange(0, HEAD_D)
    q = tl.load(q_ptr + rows[:, None] * s_qt + head[:, None] * s_qh + offs_d[None, :],
                mask=rvalid[:, None], other=0.0)
    if not LOWP:
        q = q.to(tl.float32)
    first = ctx - q_len + q0                       # position of the tile's first query
    last = tl.minimum(first + BLOCK_Q, ctx)        # one past the tile's last query
    q_pos = first + tok

    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    bt_row = bt_ptr + b * s_btb
    # Positions <= first are visible to every row: no causal mask needed there.
    acc, m_i, l_i = attn_loop(q, acc, m_i, l_i, q_pos, k_ptr, v_ptr, bt_row, kvh, 0, first + 1,
                              stride_b, stride_s, stride_h, qk_scale,
                              PAGE=PAGE, BLOCK_N=BLOCK_N, HEAD_D=HEAD_D, CAUSAL=False, LOWP=LOWP)
    acc, m_i, l_i = attn_loop(q, acc, m_i, l_i, q_pos, k_ptr, v_ptr, bt_row, kvh, first + 1, last,
                              stride_b, stride_s, stride_h, qk_scale,
                              PAGE=PAGE, BLOCK_N=BLOCK_N, HEAD_D=HEAD_D, CAUSAL=True, LOWP=LOWP)
    out, _ = finish(acc, m_i, l_i)
    tl.store(o_ptr + rows[:, None] * s_ot + head[:, None] * s_oh + offs_d[None, :], out, mask=rvalid[:, None])


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                            block_m=None):
    """Triton extend attention: q [T,Hq,D] -> out [T,Hq,D]."""
    check_cache(k_cache, v_cache)
    T, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    assert q.stride(2) == 1 and Hq % Hkv == 0
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    B = context_lens.shape[0]
    if T == 0 or B == 0:
        return out
    lowp = use_lowp_dot(k_cache.dtype)
    if block_m is None:
        # fp32 dots run on the CUDA cores: large tiles spill registers and leave SMs idle.
        block_m = (128 if D <= 64 else 64) if lowp else 32
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (T // block_q + B, Hkv)
    _extend_kernel[grid](q, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens, B,
                         q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
                         k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), scale * LOG2E,
                         GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, PAGE=page, BLOCK_N=64,
                         HEAD_D=D, LOWP=lowp)
    return out


def paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                block_m=None):
    """Plain torch (fp32 math), one vectorized step per sequence."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    ctxs = context_lens.tolist()
    for b, ctx in enumerate(ctxs):
        s0, s1 = cu[b], cu[b + 1]
        L = s1 - s0
        if L == 0:
            continue
        k = gather_kv(k_cache, block_tables[b:b + 1], ctx)[0].float()  # [ctx, Hkv, D]
        v = gather_kv(v_cache, block_tables[b:b + 1], ctx)[0].float()
        qb = q[s0:s1].float().view(L, Hkv, Hq // Hkv, D)
        s = torch.einsum("lhgd,nhd->hgln", qb, k) * scale
        q_pos = torch.arange(ctx - L, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] > q_pos[:, None]
        p = torch.softmax(s.masked_fill(mask, float("-inf")), -1)
        out[s0:s1] = torch.einsum("hgln,nhd->lhgd", p, v).reshape(L, Hq, D).to(q.dtype)
    return out
