"""RMSNorm and fused residual-add + RMSNorm with HF Llama numerics:
normalize in fp32, cast to the input dtype, then multiply by the weight."""
import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, o_ptr, ro_ptr, s_x, s_r, s_o, s_ro, n, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(r_ptr + row * s_r + offs, mask=mask, other=0.0).to(tl.float32)
        # Round the residual to the storage dtype first: HF normalizes the rounded sum.
        x = x.to(ro_ptr.dtype.element_ty)
        tl.store(ro_ptr + row * s_ro + offs, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, 0) / n
    y = (x * tl.rsqrt(var + eps)).to(o_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * s_o + offs, y * w, mask=mask)


def _launch(x, residual, weight, eps):
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty_like(x2)
    r2 = residual.reshape(-1, n) if residual is not None else x2
    new_res = torch.empty_like(x2) if residual is not None else out
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](x2, r2, weight, out, new_res, x2.stride(0), r2.stride(0), out.stride(0),
                                        new_res.stride(0), n, eps, HAS_RES=residual is not None,
                                        BLOCK=triton.next_power_of_2(n))
    return out.view(x.shape), new_res.view(x.shape)


def rms_norm(x, weight, eps):
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x, residual, weight, eps):
    """-> (rmsnorm(x + residual) * weight, x + residual)."""
    return _launch(x, residual, weight, eps)


def rms_norm_ref(x, weight, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * y.to(x.dtype)).to(x.dtype)


def fused_add_rms_norm_ref(x, residual, weight, eps):
    new_res = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_res, weight, eps), new_res
