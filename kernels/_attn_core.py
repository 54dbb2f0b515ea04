"""Shared pieces of the paged attention kernels (decode, extend, cascade).

All three kernels are "a tile of query rows against a range of cache positions
of one kv head": they differ only in which rows share a tile and whether the
mask is causal. The inner loop lives here once.
"""
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_lowp_dot(dtype: torch.dtype) -> bool:
    # On the GPU feed fp16/bf16 straight to the tensor cores (fp32 accumulate).
    # The interpreter computes bf16 dots wrongly, so there everything runs in fp32.
    return dtype in (torch.float16, torch.bfloat16) and not interpreting()


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    bs, d = k_cache.shape[1], k_cache.shape[3]
    assert bs & (bs - 1) == 0 and d & (d - 1) == 0, "block_size and head_dim must be powers of two"


@triton.jit
def attn_loop(q, acc, m_i, l_i, q_pos,
              k_ptr, v_ptr, bt_ptr, kv_head, start, end,
              stride_b, stride_s, stride_h, qk_scale,
              PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
              CAUSAL: tl.constexpr, LOWP: tl.constexpr):
    """Online-softmax accumulation of cache positions [start, end) into (acc, m_i, l_i).

    q: [M, D] (already in the dot dtype), acc: [M, D] fp32, m_i/l_i: [M] fp32 in
    the log2 domain. q_pos: [M] query positions, used only when CAUSAL.
    Positions are gathered token by token through the block table, so BLOCK_N
    is independent of the page size (pages of 8 still give dots of >= 16).
    """
    offs_d = tl.arange(0, HEAD_D)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        blk = tl.load(bt_ptr + pos // PAGE, mask=valid, other=0).to(tl.int64)
        off = blk * stride_b + (pos % PAGE) * stride_s + kv_head * stride_h
        kt = tl.load(k_ptr + off[None, :] + offs_d[:, None], mask=valid[None, :], other=0.0)
        v = tl.load(v_ptr + off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        if LOWP:
            qk = tl.dot(q, kt)
        else:
            qk = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
        qk = qk * qk_scale
        if CAUSAL:
            keep = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        else:
            keep = valid[None, :]
        qk = tl.where(keep, qk, float("-inf"))
        # m_i starts at a finite -1e30, so fully masked rows give p = 0, never NaN.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if LOWP:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def finish(acc, m_i, l_i):
    """Normalized output and natural-log LSE (-inf for rows that saw nothing)."""
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return out, lse


@triton.jit(do_not_specialize=["num_heads"])
def _merge_kernel(mid_o, mid_lse, out, lse_out,
                  s_mb, s_mh, s_ms, s_lb, s_lh, s_ob, s_oh,
                  num_heads, NUM_PARTS: tl.constexpr, PARTS_P2: tl.constexpr, HEAD_D: tl.constexpr):
    """Merge NUM_PARTS partial attentions of one (row, head) by log-sum-exp."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, PARTS_P2)
    offs_d = tl.arange(0, HEAD_D)
    smask = offs_s < NUM_PARTS
    lse = tl.load(mid_lse + b * s_lb + h * s_lh + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)  # 0 for empty parts
    o = tl.load(mid_o + b * s_mb + h * s_mh + offs_s[:, None] * s_ms + offs_d[None, :],
                mask=smask[:, None], other=0.0)
    tot = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(tot > 0.0, tot, 1.0)
    tl.store(out + b * s_ob + h * s_oh + offs_d, res)
    tl.store(lse_out + b * num_heads + h,
             tl.where(tot > 0.0, m_safe + tl.log(tl.where(tot > 0.0, tot, 1.0)), float("-inf")))


def merge_parts(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """mid_o [B,H,S,D] fp32, mid_lse [B,H,S] fp32 -> writes out [B,H,D]; returns lse [B,H]."""
    B, H, S, D = mid_o.shape
    lse = torch.empty(B, H, dtype=torch.float32, device=out.device)
    if B == 0:
        return lse
    _merge_kernel[(B, H)](mid_o, mid_lse, out, lse,
                          mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
                          mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
                          H, NUM_PARTS=S, PARTS_P2=triton.next_power_of_2(S), HEAD_D=D)
    return lse


def merge_parts_torch(o_parts: torch.Tensor, lse_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference merge: o_parts [..., S, D] fp32, lse_parts [..., S] -> (out [..., D], lse [...])."""
    m = lse_parts.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse_parts - m)
    tot = w.sum(-1, keepdim=True)
    out = (o_parts * w.unsqueeze(-1)).sum(-2) / tot.clamp_min(1e-30)
    lse = torch.where(tot > 0, m + torch.log(tot.clamp_min(1e-30)), torch.full_like(tot, float("-inf")))
    return out, lse.squeeze(-1)
