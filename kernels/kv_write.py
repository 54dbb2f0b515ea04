"""Write new tokens' K/V into the paged cache by slot (block_id * block_size + offset)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _store_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, s_kt, s_kh, s_vt, s_vh,
                  HEADS: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:  # padding token
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_D)
    mask = (offs_h < HEADS)[:, None]
    dst = slot.to(tl.int64) * (HEADS * HEAD_D) + offs_h[:, None] * HEAD_D + offs_d[None, :]
    k = tl.load(k_ptr + t * s_kt + offs_h[:, None] * s_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * s_vt + offs_h[:, None] * s_vh + offs_d[None, :], mask=mask)
    tl.store(kc_ptr + dst, k, mask=mask)
    tl.store(vc_ptr + dst, v, mask=mask)


def store_kvcache(k, v, k_cache, v_cache, slot_mapping):
    """k, v [T,Hkv,D] (may be strided views); caches [num_blocks, bs, Hkv, D] contiguous; in place."""
    T, H, D = k.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k.stride(2) == 1 and v.stride(2) == 1 and D & (D - 1) == 0
    if T == 0:
        return
    _store_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                        v.stride(1), HEADS=H, HEAD_D=D, BLOCK_H=triton.next_power_of_2(H))


def store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping):
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)
