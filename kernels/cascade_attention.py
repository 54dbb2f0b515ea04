"""Shared-prefix (cascade) decode attention, per prefix group.

Sequences of group g share prefix_block_tables[g] (prefix_lens[g] tokens, whole
blocks) and each has its own suffix blocks. The prefix kernel packs the
(sequence x GQA head) rows of one group into tiles, so each prefix KV tile is
loaded once for up to BLOCK_M rows instead of once per sequence. Suffixes run
through the plain decode kernel; both write partials into one buffer that the
decode merge kernel folds together by log-sum-exp.
"""
import torch
import triton
import triton.language as tl

from kernels._attn_core import LOG2E, attn_loop, check_cache, finish, merge_parts, use_lowp_dot
from kernels.decode_attention import (BLOCK_N, choose_num_splits, launch_decode,
                                      paged_decode_attention_lse_ref)


@triton.jit(do_not_specialize=["num_groups", "s_btg"])
def _prefix_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, plen_ptr, gcu_ptr, order_ptr, o_ptr, lse_ptr, num_groups,
                   s_qb, s_qh, s_btg, stride_b, stride_s, stride_h,
                   s_ob, s_oh, s_os, s_lb, s_lh, s_ls, qk_scale,
                   GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, NUM_SPLITS: tl.constexpr, LOWP: tl.constexpr):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    # Largest group g with gcu[g] // BLOCK_Q + g <= t (tiles of all groups packed in one axis).
    lo = 0
    hi = num_groups - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(gcu_ptr + mid) // BLOCK_Q + mid <= t:
            lo = mid
        else:
            hi = mid - 1
    g = lo
    first = tl.load(gcu_ptr + g)
    n_seqs = tl.load(gcu_ptr + g + 1) - first
    s0 = (t - (first // BLOCK_Q + g)) * BLOCK_Q
    if s0 >= n_seqs:
        return
    plen = tl.load(plen_ptr + g)
    per = tl.cdiv(tl.cdiv(plen, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = sp * per
    end = tl.minimum(start + per, plen)

    offs_m = tl.arange(0, BLOCK_M)
    sl = offs_m // GROUP
    head = kvh * GROUP + offs_m % GROUP
    rvalid = (sl < BLOCK_Q) & (s0 + sl < n_seqs)
    seq = tl.load(order_ptr + first + s0 + sl, mask=rvalid, other=0)
    offs_d = tl.arange(0, HEAD_D)
    q = tl.load(q_ptr + seq[:, None] * s_qb + head[:, None] * s_qh + offs_d[None, :], mask=rvalid[:, None], other=0.0)
    if not LOWP:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attn_loop(q, acc, m_i, l_i, offs_m, k_ptr, v_ptr, bt_ptr + g * s_btg, kvh, start, end,
                              stride_b, stride_s, stride_h, qk_scale,
                              PAGE=PAGE, BLOCK_N=BLOCK_N, HEAD_D=HEAD_D, CAUSAL=False, LOWP=LOWP)
    out, lse = finish(acc, m_i, l_i)
    tl.store(o_ptr + seq[:, None] * s_ob + head[:, None] * s_oh + sp * s_os + offs_d[None, :], out,
             mask=rvalid[:, None])
    tl.store(lse_ptr + seq * s_lb + head * s_lh + sp * s_ls, lse, mask=rvalid)


def group_layout(seq_group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence group ids -> (group_cu [G+1], order [B]): order lists the sequences
    sorted by group, group_cu[g]:group_cu[g+1] is group g's slice of it."""
    order = torch.argsort(seq_group, stable=True)
    group_cu = torch.searchsorted(seq_group[order].contiguous(),
                                  torch.arange(num_groups + 1, device=seq_group.device, dtype=seq_group.dtype))
    return group_cu.to(torch.int32), order.to(torch.int32)


def cascade_decode_attention_lse(q, k_cache, v_cache, prefix_block_tables, prefix_lens, group_cu, order,
                                 suffix_block_tables, suffix_lens, scale, block_m=None):
    """-> (out [B,Hq,D], lse [B,Hq]). Sequence order[i] for i in group_cu[g]:group_cu[g+1] reads
    prefix g (prefix_lens[g] tokens, whole blocks) and then its own suffix. Every shape is
    static and nothing syncs with the host, so this runs inside a CUDA graph; groups may be
    empty and a group with prefix length 0 holds the sequences that share nothing."""
    check_cache(k_cache, v_cache)
    B, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    G = prefix_lens.shape[0]
    out = torch.empty_like(q)
    if B == 0:
        return out, torch.empty(0, Hq, dtype=torch.float32, device=q.device)
    if block_m is None:
        block_m = 64
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    n_tiles = B // block_q + G  # enough for every group's tiles, whatever the sizes
    # Split the prefix by the tiles that do work (empty groups' tiles exit at once).
    sp = choose_num_splits(B // block_q + 1, Hkv, prefix_block_tables.shape[1] * page, q.device)
    ss = choose_num_splits(B, Hkv, suffix_block_tables.shape[1] * page, q.device)
    mid_o = torch.empty(B, Hq, sp + ss, D, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(B, Hq, sp + ss, dtype=torch.float32, device=q.device)
    _prefix_kernel[(n_tiles, Hkv, sp)](
        q, k_cache, v_cache, prefix_block_tables, prefix_lens, group_cu, order, mid_o, mid_lse, G,
        q.stride(0), q.stride(1), prefix_block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1), mid_lse.stride(2),
        scale * LOG2E, GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, PAGE=page, BLOCK_N=BLOCK_N,
        HEAD_D=D, NUM_SPLITS=sp, LOWP=use_lowp_dot(k_cache.dtype))
    launch_decode(q, k_cache, v_cache, suffix_block_tables, suffix_lens, scale, mid_o[:, :, sp:], mid_lse[:, :, sp:])
    lse = merge_parts(mid_o, mid_lse, out)
    return out, lse


def cascade_decode_attention(q, k_cache, v_cache, prefix_block_tables, prefix_lens, group_cu, order,
                             suffix_block_tables, suffix_lens, scale, block_m=None):
    return cascade_decode_attention_lse(q, k_cache, v_cache, prefix_block_tables, prefix_lens, group_cu, order,
                                        suffix_block_tables, suffix_lens, scale, block_m)[0]


def seq_groups(group_cu: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of group_layout: the group id of each sequence."""
    sizes = (group_cu[1:] - group_cu[:-1]).long()
    groups = torch.repeat_interleave(torch.arange(len(sizes), device=order.device), sizes)
    out = torch.empty(order.shape[0], dtype=torch.long, device=order.device)
    out[order.long()] = groups
    return out


def concat_block_tables(prefix_block_tables, prefix_lens, seq_group, suffix_block_tables, suffix_lens, block_size):
    """Full per-sequence tables (prefix blocks then suffix blocks) and context lengths."""
    g = seq_group.long()
    n_pre = (prefix_lens.long() // block_size)[g]  # prefixes are whole blocks
    width = prefix_block_tables.shape[1] + suffix_block_tables.shape[1]
    col = torch.arange(width, device=g.device)[None, :]
    pre = prefix_block_tables[g].long()
    pre = torch.nn.functional.pad(pre, (0, width - pre.shape[1]))
    suf_idx = (col - n_pre[:, None]).clamp(0, suffix_block_tables.shape[1] - 1)
    suf = suffix_block_tables.long().gather(1, suf_idx)
    tables = torch.where(col < n_pre[:, None], pre, suf).to(torch.int32)
    return tables, (prefix_lens[g] + suffix_lens).to(torch.int32)


def cascade_decode_attention_lse_ref(q, k_cache, v_cache, prefix_block_tables, prefix_lens, group_cu, order,
                                     suffix_block_tables, suffix_lens, scale, block_m=None):
    """Reference: plain paged decode over the concatenated tables."""
    tables, lens = concat_block_tables(prefix_block_tables, prefix_lens, seq_groups(group_cu, order),
                                       suffix_block_tables, suffix_lens, k_cache.shape[1])
    return paged_decode_attention_lse_ref(q, k_cache, v_cache, tables, lens, scale)


def cascade_decode_attention_ref(q, k_cache, v_cache, prefix_block_tables, prefix_lens, group_cu, order,
                                 suffix_block_tables, suffix_lens, scale, block_m=None):
    return cascade_decode_attention_lse_ref(q, k_cache, v_cache, prefix_block_tables, prefix_lens, group_cu, order,
                                            suffix_block_tables, suffix_lens, scale)[0]
