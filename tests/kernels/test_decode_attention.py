import pytest
import torch
from kernel_helpers import dense_kv, make_paged, naive_attention

from kernels.decode_attention import paged_decode_attention_lse, paged_decode_attention_lse_ref

CTX = [70, 200, 1, 33]
TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 2)])
def test_reference_matches_naive(hq, hkv):
    k, v, bt, cl = make_paged(CTX, hkv, 64, pad=0)
    q = torch.randn(len(CTX), hq, 64)
    out, lse = paged_decode_attention_lse_ref(q, k, v, bt, cl, 0.125)
    for b, n in enumerate(CTX):
        kd, vd = dense_kv(k, bt[b], n), dense_kv(v, bt[b], n)
        torch.testing.assert_close(out[b], naive_attention(q[b:b + 1], kd, vd, 0.125)[0], atol=1e-5, rtol=1e-5)
        s = torch.einsum("hd,nhd->hn", q[b], kd.repeat_interleave(hq // hkv, 1)) * 0.125
        torch.testing.assert_close(lse[b], torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 2)])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_triton_matches_reference(dtype, hq, hkv, splits):
    k, v, bt, cl = make_paged(CTX, hkv, 64, dtype=dtype, seed=hq)
    q = torch.randn(len(CTX), hq, 64).to(dtype)
    out, lse = paged_decode_attention_lse(q, k, v, bt, cl, 0.125, num_splits=splits)
    ref, ref_lse = paged_decode_attention_lse_ref(q, k, v, bt, cl, 0.125)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_block_size_8_head_dim_128_and_empty_sequence():
    ctx = [0, 45, 9]
    k, v, bt, cl = make_paged(ctx, 1, 128, block_size=8)
    q = torch.randn(3, 3, 128)
    out, lse = paged_decode_attention_lse(q, k, v, bt, cl, 0.09, num_splits=2)
    ref, ref_lse = paged_decode_attention_lse_ref(q, k, v, bt, cl, 0.09)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    torch.testing.assert_close(lse, ref_lse)
