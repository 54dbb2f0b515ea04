"""Random paged caches and a naive dense attention used to check the references."""
import math

import torch


def make_paged(ctx_lens, num_kv_heads, head_dim, block_size=16, dtype=torch.float32, seed=0, pad=-1):
    """Random k/v caches with shuffled blocks; returns (k_cache, v_cache, block_tables int32, context_lens int32)."""
    g = torch.Generator().manual_seed(seed)
    nbs = [math.ceil(c / block_size) for c in ctx_lens]
    total = sum(nbs) + 3  # a few unused blocks
    k = torch.randn(total, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(total, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(total, generator=g)
    width = max(nbs + [1]) + 1  # one padding column at least
    bt = torch.full((len(ctx_lens), width), pad, dtype=torch.int32)
    i = 0
    for b, n in enumerate(nbs):
        bt[b, :n] = perm[i:i + n].to(torch.int32)
        i += n
    return k, v, bt, torch.tensor(ctx_lens, dtype=torch.int32)


def dense_kv(cache, bt_row, n):
    """Token-by-token gather of one sequence's first n cache entries -> [n, H, D]."""
    bs = cache.shape[1]
    return torch.stack([cache[bt_row[p // bs], p % bs] for p in range(n)]) if n else cache[:0, 0]


def naive_attention(q, k, v, scale, q_pos=None):
    """q [M,Hq,D], k/v [N,Hkv,D] dense fp32 softmax; q_pos gives causal limits (key pos <= q_pos)."""
    hq, hkv = q.shape[1], k.shape[1]
    k = k.float().repeat_interleave(hq // hkv, dim=1)
    v = v.float().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q.float(), k) * scale
    if q_pos is not None:
        mask = torch.arange(k.shape[0])[None, :] > q_pos[:, None]
        s = s.masked_fill(mask[None], float("-inf"))
    return torch.einsum("hmn,nhd->mhd", torch.softmax(s, -1), v)
