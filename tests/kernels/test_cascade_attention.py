import pytest
import torch

from kernels.cascade_attention import (cascade_decode_attention_lse, cascade_decode_attention_lse_ref,
                                       concat_block_tables, group_layout, seq_groups)
from kernels.decode_attention import paged_decode_attention_lse, paged_decode_attention_lse_ref

BS = 16


def _setup(hq, hkv, dtype, seed=0):
    """3 prefix groups (2, 0 and 1 blocks; one group unused by a sequence is fine), 6 sequences."""
    g = torch.Generator().manual_seed(seed)
    nb = 40
    k = torch.randn(nb, BS, hkv, 64, generator=g).to(dtype)
    v = torch.randn(nb, BS, hkv, 64, generator=g).to(dtype)
    perm = torch.randperm(nb, generator=g).to(torch.int32)
    pbt = torch.full((4, 3), -1, dtype=torch.int32)
    pbt[0, :2], pbt[2, :1] = perm[:2], perm[2:3]
    plens = torch.tensor([32, 0, 16, 0], dtype=torch.int32)
    seq_group = torch.tensor([2, 0, 1, 0, 0, 2], dtype=torch.int32)
    slens = torch.tensor([5, 17, 40, 1, 0, 16], dtype=torch.int32)
    sbt = torch.full((6, 4), -1, dtype=torch.int32)
    i = 3
    for b, n in enumerate(slens.tolist()):
        nblk = (n + BS - 1) // BS
        sbt[b, :nblk] = perm[i:i + nblk]
        i += nblk
    q = torch.randn(6, hq, 64, generator=g).to(dtype)
    return q, k, v, pbt, plens, seq_group, sbt, slens


def test_concat_tables():
    q, k, v, pbt, plens, sg, sbt, slens = _setup(2, 2, torch.float32)
    tables, lens = concat_block_tables(pbt, plens, sg, sbt, slens, BS)
    assert lens.tolist() == [21, 49, 40, 33, 32, 32]
    assert tables[1, :4].tolist() == pbt[0, :2].tolist() + sbt[1, :2].tolist()
    assert tables[0, :2].tolist() == [pbt[2, 0].item(), sbt[0, 0].item()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 2)])
def test_cascade_matches_plain_decode(dtype, hq, hkv):
    q, k, v, pbt, plens, sg, sbt, slens = _setup(hq, hkv, dtype, seed=hq)
    gcu, order = group_layout(sg, pbt.shape[0])
    assert seq_groups(gcu, order).tolist() == sg.tolist()
    args = (q, k, v, pbt, plens, gcu, order, sbt, slens)
    out, lse = cascade_decode_attention_lse(*args, 0.125, block_m=16)
    ref, ref_lse = cascade_decode_attention_lse_ref(*args, 0.125)
    tables, lens = concat_block_tables(pbt, plens, sg, sbt, slens, BS)
    plain, plain_lse = paged_decode_attention_lse(q, k, v, tables, lens, 0.125)
    torch.testing.assert_close(ref, paged_decode_attention_lse_ref(q, k, v, tables, lens, 0.125)[0])
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(out, plain, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
