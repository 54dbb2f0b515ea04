"""Our Llama-family decoder: Llama 2/3/3.1, Mistral, Qwen2 (qkv bias) and Qwen3
(q/k norm). One class covers them; the differences are config flags.

The forward takes flat tensors: every scheduled token of every request is one
row, and attention finds its sequence through `AttentionMetadata`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels import ops


@dataclass
class ModelArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None = None


@dataclass
class CascadeMetadata:
    """Decode rows grouped by shared prefix blocks (see engine/cascade_plan.py)."""
    prefix_block_tables: torch.Tensor  # [G, max_blocks] int32
    prefix_lens: torch.Tensor  # [G] int32
    group_cu: torch.Tensor  # [G+1] int32
    order: torch.Tensor  # [B] int32
    suffix_block_tables: torch.Tensor  # [B, max_blocks] int32
    suffix_lens: torch.Tensor  # [B] int32


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, -1 = do not write
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32: tokens in cache after this step
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    is_decode: bool  # every sequence has exactly one new token
    max_q_len: int = 1
    max_context_len: int = 0  # host-side bound, for kernel grid sizing
    cascade: CascadeMetadata | None = None  # decode only: read shared prefixes once per group


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_size = a.num_heads * a.head_dim
        self.kv_size = a.num_kv_heads * a.head_dim
        self.scale = a.head_dim ** -0.5
        self.qkv_proj = nn.Linear(a.hidden_size, self.q_size + 2 * self.kv_size, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, a.hidden_size, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # Set by the model runner once the KV pool exists.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = ops.apply_rotary(q, k, positions, cos_sin)
        ops.store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if meta.is_decode and meta.cascade is not None:
            c = meta.cascade
            o = ops.cascade_decode_attention(q, self.k_cache, self.v_cache, c.prefix_block_tables, c.prefix_lens,
                                             c.group_cu, c.order, c.suffix_block_tables, c.suffix_lens, self.scale)
        elif meta.is_decode:
            o = ops.paged_decode_attention(q, self.k_cache, self.v_cache, meta.block_tables,
                                           meta.context_lens, self.scale)
        else:
            o = ops.paged_prefill_attention(q, self.k_cache, self.v_cache, meta.block_tables,
                                            meta.cu_seqlens_q, meta.context_lens, self.scale)
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, residual, positions, cos_sin, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, cos_sin, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        self.arch = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.lm_head = None if a.tie_word_embeddings else nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Returns final hidden states [T, hidden]; `compute_logits` picks the rows needed."""
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.cos_sin, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, w)
