"""Configs of well-known models, for random-weight stand-ins (`--dummy-weights NAME`):
speed depends on the shapes, not on the weight values."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

SHAPES: dict[str, dict] = {
    "qwen3-0.6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936,
                       hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=40960, tie_word_embeddings=True, eos_token_id=151645),
    "llama-3.1-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
                         hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         max_position_embeddings=131072, tie_word_embeddings=False, eos_token_id=128001),
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152,
                         hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True, eos_token_id=2),
}


def dummy_model_dir(name: str) -> str:
    """A folder holding only config.json, for `load_format="dummy"`."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    d = Path(tempfile.mkdtemp(prefix=f"prefixq-dummy-{name}-"))
    (d / "config.json").write_text(json.dumps(SHAPES[name], indent=1))
    return str(d)
