"""Tiny random Hugging Face checkpoints of each supported family, for engine tests."""
from __future__ import annotations

import functools
import os
import tempfile

import torch

FAMILIES = {
    # name: (config class path, extra config)
    "llama": ("LlamaConfig", {}),
    "llama3-rope": ("LlamaConfig", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64},
                                    "rope_theta": 500000.0}),
    "llama-gqa3-tied": ("LlamaConfig", {"num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 16,
                                        "hidden_size": 144, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
}


def _config(family: str):
    import transformers
    cls_name, extra = FAMILIES[family]
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                initializer_range=0.15, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None,
                pad_token_id=0)
    base.update(extra)
    if "rope_scaling" in base:
        # transformers 5 reads rope settings from rope_parameters
        rp = dict(base.pop("rope_scaling"))
        rp["rope_theta"] = base.pop("rope_theta")
        base["rope_parameters"] = rp
    return getattr(transformers, cls_name)(**base)


@functools.lru_cache(maxsize=None)
def tiny_model_dir(family: str) -> str:
    """Save a seeded random model of the family once per test session."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1234)
    cfg = _config(family)
    model = AutoModelForCausalLM.from_config(cfg).float()
    d = tempfile.mkdtemp(prefix=f"prefixq-tiny-{family}-")
    model.save_pretrained(d)
    return d


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers `generate`, one prompt at a time (no padding), float32."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            outs.append(out[0, len(p):].tolist())
    return outs


def mixed_prompts(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(1, vocab, (L,), generator=g).tolist() for L in lens]


def smollm2_dir() -> str:
    from engine.model_source import resolve_model
    return resolve_model("smollm2")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
