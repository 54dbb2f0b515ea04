"""Engine settings, named as vLLM users know them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str
    device: str = "auto"  # "auto" picks cuda when available
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    kv_cache_memory: int = 256 * 1024 * 1024  # bytes for the KV pool on CPU
    num_gpu_blocks_override: int | None = None  # fixes the pool size (tests, benchmarks)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    cache_salt: str = ""  # extra key mixed into every block hash
    enforce_eager: bool = False  # no CUDA graphs
    # Prepare step n+1 while step n runs: "auto" on the GPU; True also on the CPU (tests).
    async_scheduling: bool | str = "auto"
    # Decode steps run back to back on the device per host step when every request of a
    # step only decodes (vLLM's multi-step scheduling): the host's per-request work is paid
    # once per burst. 1: off. Not with speculation (its steps draft). See engine/decode_burst.py.
    num_scheduler_steps: int = 1
    # Shared-prefix (cascade) decode attention when many running rows share prefix blocks:
    # "auto" on the GPU for models with KV rows >= 512 wide (kv heads x head dim; see
    # engine/model_runner.py), True always (also on the CPU: tests), False never.
    cascade_attention: bool | str = "auto"
    # Move everything alive after start-up out of the garbage collector's reach (gc.freeze):
    # "auto" on the GPU, where a full collection's stall shows in step times.
    freeze_gc: bool | str = "auto"
    seed: int = 0
    load_format: str = "auto"  # "dummy": random weights in the checkpoint's shapes
    # speculative decoding
    speculative_method: str | None = None  # None, "ngram", "suffix", "draft"
    speculative_model: str | None = None
    num_speculative_tokens: int = 0
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    adaptive_speculation: bool = True
    # n-gram/suffix, async output: after a plain step, draft from the token in flight as the
    # proposer guesses it (no wait) instead of waiting for it (exact drafts, lost overlap).
    # Off by default: on the H100 waiting measured faster (docs/benchmarks.md).
    speculative_draft_ahead: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_scheduler_steps < 1:
            raise ValueError(f"num_scheduler_steps must be >= 1, got {self.num_scheduler_steps}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0 (0: the method's default), "
                             f"got {self.num_speculative_tokens}")
        if self.speculative_model and not self.speculative_method:
            self.speculative_method = "draft"
        if self.speculative_method and self.num_speculative_tokens <= 0:
            # Host-side lookups draft 8: measured on the H100 (SmolLM2, 8f44e4a against 425ca63),
            # copying ran 2.5-3.0x at batch 1 and 8 and 1.5-1.6x at batch 32 with k = 8, against
            # 1.4-2.1x and 1.2x with 4; the controller still picks fewer where acceptance is low.
            # A draft model runs a forward per draft token: 4.
            self.num_speculative_tokens = 4 if self.speculative_method == "draft" else 8
