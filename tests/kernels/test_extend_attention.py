import pytest
import torch
from kernel_helpers import dense_kv, make_paged, naive_attention

from kernels.extend_attention import paged_prefill_attention, paged_prefill_attention_ref

# (context, new tokens): fresh prefill, cached prefix + chunk, decode (q_len 1), spec verify (k+1 = 4), empty.
CASES = [(40, 40), (70, 30), (5, 1), (33, 4), (17, 0), (1, 1)]
TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


def _setup(hq, hkv, dtype, seed=0, block_size=16):
    ctx = [c for c, _ in CASES]
    qlens = torch.tensor([n for _, n in CASES])
    cu = torch.zeros(len(CASES) + 1, dtype=torch.int32)
    cu[1:] = qlens.cumsum(0)
    k, v, bt, cl = make_paged(ctx, hkv, 64, block_size=block_size, dtype=dtype, seed=seed)
    q = torch.randn(int(cu[-1]), hq, 64).to(dtype)
    return q, k, v, bt, cu, cl


@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 2)])
def test_reference_matches_naive(hq, hkv):
    q, k, v, bt, cu, cl = _setup(hq, hkv, torch.float32)
    out = paged_prefill_attention_ref(q, k, v, bt, cu, cl, 0.125)
    for b, (ctx, n) in enumerate(CASES):
        if n == 0:
            continue
        exp = naive_attention(q[cu[b]:cu[b + 1]], dense_kv(k, bt[b], ctx), dense_kv(v, bt[b], ctx), 0.125,
                              q_pos=torch.arange(ctx - n, ctx))
        torch.testing.assert_close(out[cu[b]:cu[b + 1]], exp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 2)])
@pytest.mark.parametrize("block_m", [16, None])
def test_triton_matches_reference(dtype, hq, hkv, block_m):
    q, k, v, bt, cu, cl = _setup(hq, hkv, dtype, seed=hq)
    out = paged_prefill_attention(q, k, v, bt, cu, cl, 0.125, block_m=block_m)
    ref = paged_prefill_attention_ref(q, k, v, bt, cu, cl, 0.125)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_block_size_8():
    q, k, v, bt, cu, cl = _setup(3, 1, torch.float32, block_size=8)
    out = paged_prefill_attention(q, k, v, bt, cu, cl, 0.125, block_m=16)
    torch.testing.assert_close(out, paged_prefill_attention_ref(q, k, v, bt, cu, cl, 0.125), atol=1e-4, rtol=1e-4)
