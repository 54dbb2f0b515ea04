"""bf16 on the GPU, Triton vs reference: relative error < 1e-2, never NaN."""
import pytest
import torch

from kernels import activation, cascade_attention, decode_attention, extend_attention, kv_write, rmsnorm, rotary

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF = torch.bfloat16


def rel_err(a, b):
    a, b = a.float(), b.float()
    assert not a.isnan().any(), "NaN in Triton output"
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def paged(B, ctx_max, hkv, d, bs=16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ctx = torch.randint(1, ctx_max + 1, (B,), device="cuda", generator=g, dtype=torch.int32)
    nb = (ctx_max + bs - 1) // bs
    k = torch.randn(B * nb + 1, bs, hkv, d, device="cuda", dtype=BF, generator=g)
    v = torch.randn_like(k)
    bt = torch.randperm(B * nb, device="cuda", generator=g).view(B, nb).to(torch.int32)
    return k, v, bt, ctx


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (16, 8, 128), (32, 8, 128)])
@pytest.mark.parametrize("B,ctx", [(1, 4000), (64, 600)])
def test_decode_bf16(hq, hkv, d, B, ctx):
    k, v, bt, cl = paged(B, ctx, hkv, d)
    q = torch.randn(B, hq, d, device="cuda", dtype=BF)
    out = decode_attention.paged_decode_attention(q, k, v, bt, cl, d ** -0.5)
    assert rel_err(out, decode_attention.paged_decode_attention_ref(q, k, v, bt, cl, d ** -0.5)) < 1e-2


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (16, 8, 128)])
def test_extend_bf16(hq, hkv, d):
    k, v, bt, cl = paged(8, 700, hkv, d)
    qlens = torch.minimum(cl, torch.tensor([300, 1, 4, 700, 50, 2, 129, 64], device="cuda", dtype=torch.int32))
    cu = torch.zeros(9, dtype=torch.int32, device="cuda")
    cu[1:] = qlens.cumsum(0)
    q = torch.randn(int(cu[-1]), hq, d, device="cuda", dtype=BF)
    out = extend_attention.paged_prefill_attention(q, k, v, bt, cu, cl, d ** -0.5)
    assert rel_err(out, extend_attention.paged_prefill_attention_ref(q, k, v, bt, cu, cl, d ** -0.5)) < 1e-2


def test_cascade_bf16():
    hq, hkv, d, bs = 16, 8, 128, 16
    B, G = 96, 3
    k = torch.randn(2000, bs, hkv, d, device="cuda", dtype=BF)
    v = torch.randn_like(k)
    perm = torch.randperm(2000, device="cuda").to(torch.int32)
    pbt = perm[:G * 48].view(G, 48)
    plens = torch.tensor([768, 320, 0], device="cuda", dtype=torch.int32)
    sg = torch.randint(0, G, (B,), device="cuda", dtype=torch.int32)
    sbt = perm[G * 48:G * 48 + B * 17].view(B, 17)
    slens = torch.randint(1, 17 * bs, (B,), device="cuda", dtype=torch.int32)
    q = torch.randn(B, hq, d, device="cuda", dtype=BF)
    args = (q, k, v, pbt, plens, sg, sbt, slens, d ** -0.5)
    out = cascade_attention.cascade_decode_attention(*args)
    assert rel_err(out, cascade_attention.cascade_decode_attention_ref(*args)) < 1e-2


def test_small_kernels_bf16():
    x = torch.randn(300, 2 * 1536, device="cuda", dtype=BF)
    assert rel_err(activation.silu_and_mul(x), activation.silu_and_mul_ref(x)) < 1e-2
    h, r = torch.randn(300, 1024, device="cuda", dtype=BF), torch.randn(300, 1024, device="cuda", dtype=BF)
    w = torch.randn(1024, device="cuda", dtype=BF)
    assert rel_err(rmsnorm.rms_norm(h, w, 1e-6), rmsnorm.rms_norm_ref(h, w, 1e-6)) < 1e-2
    (o, nr), (ro, rr) = rmsnorm.fused_add_rms_norm(h, r, w, 1e-6), rmsnorm.fused_add_rms_norm_ref(h, r, w, 1e-6)
    assert rel_err(o, ro) < 1e-2 and torch.equal(nr, rr)
    cs = rotary.build_rope_cache(128, 8192, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, device="cuda")
    q, kk = torch.randn(300, 32, 128, device="cuda", dtype=BF), torch.randn(300, 8, 128, device="cuda", dtype=BF)
    pos = torch.randint(0, 8192, (300,), device="cuda")
    for a, b in zip(rotary.apply_rotary(q, kk, pos, cs), rotary.apply_rotary_ref(q, kk, pos, cs)):
        assert rel_err(a, b) < 1e-2
    kc, vc = torch.zeros(64, 16, 8, 128, device="cuda", dtype=BF), torch.zeros(64, 16, 8, 128, device="cuda", dtype=BF)
    kr, vr = kc.clone(), vc.clone()
    slots = torch.randperm(1024, device="cuda")[:300]
    slots[::7] = -1
    kv_write.store_kvcache(kk, kk, kc, vc, slots)
    kv_write.store_kvcache_ref(kk, kk, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
