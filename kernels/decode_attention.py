"""Paged decode attention (one new query token per sequence), flash-decoding style.

Grid: (sequence, kv head, split). A program loads each KV tile of its split once
for all query heads of its GQA group (padded to >= 16 rows for tl.dot). Splits
write normalized partials + LSE that a second kernel merges by log-sum-exp.
"""
import functools

import torch
import triton
import triton.language as tl

from kernels._attn_core import (LOG2E, attn_loop, check_cache, finish, merge_parts, use_lowp_dot)

BLOCK_N = 64          # cache positions per inner-loop tile
MIN_SPLIT_TOKENS = 256  # don't split below this many tokens per program
MAX_SPLITS = 32


@triton.jit(do_not_specialize=["s_btb"])  # block-table width changes every step
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, o_ptr, lse_ptr,
                   s_qb, s_qh, s_btb, stride_b, stride_s, stride_h,
                   s_ob, s_oh, s_os, s_lb, s_lh, s_ls, qk_scale,
                   GROUP: tl.constexpr, BLOCK_H: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   LOWP: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    # Each sequence splits its own length evenly, in whole tiles; tail splits may be empty.
    per = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = sp * per
    end = tl.minimum(start + per, ctx)

    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    offs_d = tl.arange(0, HEAD_D)
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=hmask[:, None], other=0.0)
    if not LOWP:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc, m_i, l_i = attn_loop(q, acc, m_i, l_i, offs_h, k_ptr, v_ptr, bt_ptr + b * s_btb, kvh, start, end,
                              stride_b, stride_s, stride_h, qk_scale,
                              PAGE=PAGE, BLOCK_N=BLOCK_N, HEAD_D=HEAD_D, CAUSAL=False, LOWP=LOWP)
    out, lse = finish(acc, m_i, l_i)
    tl.store(o_ptr + b * s_ob + heads[:, None] * s_oh + sp * s_os + offs_d[None, :], out, mask=hmask[:, None])
    tl.store(lse_ptr + b * s_lb + heads * s_lh + sp * s_ls, lse, mask=hmask)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Enough programs to fill the GPU about twice, but >= MIN_SPLIT_TOKENS per split.

    max_context is a static bound (block-table width x block size), so this
    never syncs with the device and stays valid under CUDA graph capture.
    """
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 8
    want = triton.cdiv(2 * sms, max(1, batch * num_kv_heads))
    useful = triton.cdiv(max_context, MIN_SPLIT_TOKENS)
    return max(1, min(want, useful, MAX_SPLITS))


def launch_decode(q, k_cache, v_cache, block_tables, context_lens, scale, mid_o, mid_lse):
    """Run the split kernel; writes partial i of each (seq, head) to mid_o[:, :, i], mid_lse[:, :, i]."""
    B, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    splits = mid_o.shape[2]
    assert q.stride(2) == 1 and Hq % Hkv == 0
    if B == 0:
        return
    _decode_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, mid_o, mid_lse,
        q.stride(0), q.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), mid_lse.stride(2), scale * LOG2E,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), PAGE=page,
        BLOCK_N=BLOCK_N, HEAD_D=D, NUM_SPLITS=splits, LOWP=use_lowp_dot(k_cache.dtype))


def paged_decode_attention_lse(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None):
    """Triton decode attention -> (out [B,Hq,D] in q.dtype, lse [B,Hq] fp32, natural log)."""
    check_cache(k_cache, v_cache)
    B, Hq, D = q.shape
    if num_splits is None:
        num_splits = choose_num_splits(B, k_cache.shape[2], block_tables.shape[1] * k_cache.shape[1], q.device)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    if num_splits == 1:
        # No merge needed: the kernel writes the final output directly.
        lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
        launch_decode(q, k_cache, v_cache, block_tables, context_lens, scale, out.unsqueeze(2), lse.unsqueeze(2))
        return out, lse
    mid_o = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    launch_decode(q, k_cache, v_cache, block_tables, context_lens, scale, mid_o, mid_lse)
    lse = merge_parts(mid_o, mid_lse, out)
    return out, lse


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None):
    return paged_decode_attention_lse(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)[0]


# ---------------------------------------------------------------- reference

def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[num_blocks, bs, H, D] + tables [B, nb] -> dense [B, n_tokens, H, D] (padding clamped, masked later)."""
    bs = cache.shape[1]
    nb = triton.cdiv(n_tokens, bs)
    bt = block_tables[:, :nb].long().clamp(0, cache.shape[0] - 1)
    return cache[bt].flatten(1, 2)[:, :n_tokens]


def paged_decode_attention_lse_ref(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None):
    """Plain torch (fp32 math), batched over sequences: (out [B,Hq,D], lse [B,Hq])."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    n = int(context_lens.max().item()) if B else 0
    if n == 0:
        return torch.zeros_like(q), torch.full((B, Hq), float("-inf"), device=q.device)
    k = gather_kv(k_cache, block_tables, n).float()  # [B, n, Hkv, D]
    v = gather_kv(v_cache, block_tables, n).float()
    qg = q.float().view(B, Hkv, Hq // Hkv, D)
    s = torch.einsum("bhgd,bnhd->bhgn", qg, k) * scale
    valid = torch.arange(n, device=q.device)[None, :] < context_lens[:, None].to(q.device)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)  # -inf for empty sequences
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = torch.einsum("bhgn,bnhd->bhgd", p, v)
    return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None):
    return paged_decode_attention_lse_ref(q, k_cache, v_cache, block_tables, context_lens, scale)[0]
