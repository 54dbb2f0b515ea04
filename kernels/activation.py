"""SiLU-and-mul for gated MLPs: out = silu(x[:, :I]) * x[:, I:]."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(x_ptr, o_ptr, s_xt, s_ot, inter, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    a = tl.load(x_ptr + t * s_xt + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + t * s_xt + inter + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + t * s_ot + offs, a * tl.sigmoid(a) * b, mask=mask)


def silu_and_mul(x):
    """x [T, 2I] -> [T, I] (fp32 math, one rounding)."""
    x2 = x.reshape(-1, x.shape[-1])
    assert x2.stride(-1) == 1
    inter = x2.shape[1] // 2
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(inter, BLOCK))](x2, out, x2.stride(0), out.stride(0), inter,
                                                                   BLOCK=BLOCK)
    return out.view(*x.shape[:-1], inter)


def silu_and_mul_ref(x):
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]
