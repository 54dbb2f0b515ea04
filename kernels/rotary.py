"""Rotary position embedding, neox / HF "rotate_half" style (pairs i and i + D/2)."""
import math

import torch
import triton
import triton.language as tl


def _inv_freq(head_dim, base, scaling, device):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    assert rope_type == "llama3", f"unsupported rope_type {rope_type}"
    # Same arithmetic, in the same order, as transformers' _compute_llama3_parameters.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    llama = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * llama / factor + smooth * llama
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, llama)


def build_rope_cache(head_dim, max_pos, base, scaling=None, device=None, dtype=torch.float32):
    """-> cos_sin [max_pos, head_dim]: cos of the D/2 frequencies, then their sin."""
    inv_freq = _inv_freq(head_dim, base, scaling, device)
    freqs = torch.arange(max_pos, device=device).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


@triton.jit
def _rope_kernel(x_ptr, o_ptr, pos_ptr, cs_ptr, s_xt, s_xh, s_ot, s_oh, s_cs,
                 HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    mask = (offs_h < HEADS)[:, None]
    cos = tl.load(cs_ptr + pos * s_cs + offs_d).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * s_cs + HALF + offs_d).to(tl.float32)[None, :]
    src = x_ptr + t * s_xt + offs_h[:, None] * s_xh + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = o_ptr + t * s_ot + offs_h[:, None] * s_oh + offs_d[None, :]
    tl.store(dst, x1 * cos - x2 * sin, mask=mask)
    tl.store(dst + HALF, x2 * cos + x1 * sin, mask=mask)


def _rope_one(x, positions, cos_sin):
    T, H, D = x.shape
    assert x.stride(2) == 1 and cos_sin.stride(1) == 1
    out = torch.empty(T, H, D, dtype=x.dtype, device=x.device)
    if T:
        _rope_kernel[(T,)](x, out, positions, cos_sin, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                           cos_sin.stride(0), HEADS=H, BLOCK_H=triton.next_power_of_2(H), HALF=D // 2)
    return out


def apply_rotary(q, k, positions, cos_sin):
    """q [T,Hq,D], k [T,Hkv,D], positions int64 [T] -> new (q, k); fp32 math, one rounding."""
    return _rope_one(q, positions, cos_sin), _rope_one(k, positions, cos_sin)


def apply_rotary_ref(q, k, positions, cos_sin):
    """HF formula x * cos + rotate_half(x) * sin, in the input dtype (as HF does)."""
    half = cos_sin.shape[1] // 2
    cs = cos_sin[positions]
    cos = torch.cat([cs[:, :half], cs[:, :half]], -1)[:, None, :]
    sin = torch.cat([cs[:, half:], cs[:, half:]], -1)[:, None, :]

    def rot(x):
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return x * c + torch.cat([-x2, x1], -1) * s

    return rot(q), rot(k)
