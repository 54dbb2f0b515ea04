import pytest
import torch

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.kv_write import store_kvcache, store_kvcache_ref
from kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from kernels.rotary import apply_rotary, apply_rotary_ref, build_rope_cache

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kvcache_skips_negative_slots(dtype):
    kc = torch.zeros(4, 16, 3, 64, dtype=dtype)
    vc = torch.zeros_like(kc)
    kv = torch.randn(5, 2 * 3, 64).to(dtype)
    k, v = kv[:, :3], kv[:, 3:]  # strided views, as sliced from a fused projection
    slots = torch.tensor([0, 17, -1, 63, 40], dtype=torch.int64)
    kr, vr = kc.clone(), vc.clone()
    store_kvcache(k, v, kc, vc, slots)
    store_kvcache_ref(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    assert torch.equal(kc[1, 1], k[1]) and torch.equal(vc[3, 15], v[3])
    assert kc.view(-1, 3, 64).abs().sum((1, 2)).count_nonzero() == 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    x = torch.randn(7, 96).to(dtype)
    r = torch.randn(7, 96).to(dtype)
    w = (1 + 0.1 * torch.randn(96)).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), **tol)
    out, res = fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = fused_add_rms_norm_ref(x, r, w, 1e-6)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, **tol)


def test_rms_norm_ref_matches_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(64, eps=1e-5)
    norm.weight.data = (1 + 0.1 * torch.randn(64))
    x = torch.randn(5, 64)
    torch.testing.assert_close(rms_norm_ref(x, norm.weight.data, 1e-5), norm(x), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = torch.randn(6, 2 * 80).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), atol=tol, rtol=tol)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}


@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["default", "llama3"])
def test_rope_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      rope_theta=500000.0, rope_scaling=scaling)
    T = 40
    pos = torch.randint(0, 4096, (T,))
    q, k = torch.randn(1, 4, T, 128), torch.randn(1, 2, T, 128)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, pos[None])
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    cs = build_rope_cache(128, 4096, 500000.0, scaling)
    oq, ok = apply_rotary_ref(q[0].transpose(0, 1), k[0].transpose(0, 1), pos, cs)
    torch.testing.assert_close(oq, hq[0].transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(ok, hk[0].transpose(0, 1), atol=0, rtol=0)
    tq, tk = apply_rotary(q[0].transpose(0, 1), k[0].transpose(0, 1), pos, cs)  # strided inputs
    torch.testing.assert_close(tq, oq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tk, ok, atol=1e-5, rtol=1e-5)


def test_rope_fp16():
    cs = build_rope_cache(64, 512, 10000.0)
    q, k = torch.randn(9, 3, 64).half(), torch.randn(9, 1, 64).half()
    pos = torch.randint(0, 512, (9,))
    for a, b in zip(apply_rotary(q, k, pos, cs), apply_rotary_ref(q, k, pos, cs)):
        torch.testing.assert_close(a, b, atol=4e-3, rtol=4e-3)
