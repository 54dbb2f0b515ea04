"""The ops the engine calls. Triton on CUDA tensors, the torch reference otherwise.

PREFIXQ_KERNELS=reference|triton forces one side (triton on CPU needs TRITON_INTERPRET=1).
"""
import os

import torch

from kernels import (activation, cascade_attention, decode_attention, extend_attention, kv_write, rmsnorm, rotary,
                     step_inputs)
from kernels.rotary import build_rope_cache  # noqa: F401  (plain torch, no dispatch)


def _use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("PREFIXQ_KERNELS", "").lower()
    if mode == "reference":
        return False
    if mode == "triton":
        return True
    return t.is_cuda


def _dispatch(triton_fn, ref_fn):
    def op(first, *args, **kwargs):
        return (triton_fn if _use_triton(first) else ref_fn)(first, *args, **kwargs)
    op.__name__ = triton_fn.__name__
    op.__doc__ = triton_fn.__doc__
    return op


paged_decode_attention = _dispatch(decode_attention.paged_decode_attention,
                                   decode_attention.paged_decode_attention_ref)
paged_decode_attention_lse = _dispatch(decode_attention.paged_decode_attention_lse,
                                       decode_attention.paged_decode_attention_lse_ref)
paged_prefill_attention = _dispatch(extend_attention.paged_prefill_attention,
                                    extend_attention.paged_prefill_attention_ref)
cascade_decode_attention = _dispatch(cascade_attention.cascade_decode_attention,
                                     cascade_attention.cascade_decode_attention_ref)
cascade_decode_attention_lse = _dispatch(cascade_attention.cascade_decode_attention_lse,
                                         cascade_attention.cascade_decode_attention_lse_ref)
store_kvcache = _dispatch(kv_write.store_kvcache, kv_write.store_kvcache_ref)
rms_norm = _dispatch(rmsnorm.rms_norm, rmsnorm.rms_norm_ref)
fused_add_rms_norm = _dispatch(rmsnorm.fused_add_rms_norm, rmsnorm.fused_add_rms_norm_ref)
apply_rotary = _dispatch(rotary.apply_rotary, rotary.apply_rotary_ref)
silu_and_mul = _dispatch(activation.silu_and_mul, activation.silu_and_mul_ref)
concat_block_tables = cascade_attention.concat_block_tables
patch_step_inputs = _dispatch(step_inputs.patch_step_inputs, step_inputs.patch_step_inputs_ref)
greedy_accept = _dispatch(step_inputs.greedy_accept, step_inputs.greedy_accept_ref)
