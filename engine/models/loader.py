"""Build our model from a Hugging Face folder: read config.json, then load the
safetensors shards by name mapping (q/k/v fuse into qkv_proj, gate/up into gate_up_proj)."""
from __future__ import annotations

import glob
import json
import os
import re

import torch

from engine.models.llama import LlamaForCausalLM, ModelArch

SUPPORTED_FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class UnsupportedModelError(ValueError):
    pass


def read_config(path: str) -> dict:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json; --model takes a Hugging Face model folder")
    with open(cfg_file) as f:
        return json.load(f)


def arch_from_config(cfg: dict) -> ModelArch:
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported; supported families: "
            + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items()))
    heads = cfg["num_attention_heads"]
    # transformers 5 nests rope settings in rope_parameters; 4.x keeps them flat.
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        if rtype not in ("default", "llama3"):
            raise UnsupportedModelError(f"rope scaling {rtype!r} is not supported (default, llama3)")
        scaling = None if rtype == "default" else dict(scaling, rope_type=rtype)
    return ModelArch(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2" or bool(cfg.get("attention_bias", False)),
        o_bias=mt != "qwen2" and bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=mt == "qwen3",
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", mt == "mistral") else None,
    )


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = {  # HF name -> (our name, shard index)
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def _shard_offsets(a: ModelArch, fused: str) -> list[int]:
    if fused.endswith("qkv_proj"):
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        return [0, q, q + kv, q + 2 * kv]
    return [0, a.intermediate_size, 2 * a.intermediate_size]


def _checkpoint_files(path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights found")
    return files


def load_weights(model: LlamaForCausalLM, path: str) -> None:
    from safetensors import safe_open

    a = model.arch
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in _checkpoint_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if "rotary_emb" in name:
                    continue
                if name == "lm_head.weight" and a.tie_word_embeddings:
                    continue
                tensor = f.get_tensor(name)
                m = _LAYER.match(name)
                target, shard = None, None
                if m:
                    layer, rest = m.groups()
                    mod, _, kind = rest.rpartition(".")
                    if mod in _FUSED:
                        fused, shard = _FUSED[mod]
                        target = f"layers.{layer}.{fused}.{kind}"
                    else:
                        target = f"layers.{layer}.{rest}"
                else:
                    target = name.removeprefix("model.")
                if target not in params:
                    raise ValueError(f"{file}: unexpected weight {name!r} for this architecture")
                p = params[target]
                with torch.no_grad():
                    if shard is None:
                        p.copy_(tensor)
                    else:
                        off = _shard_offsets(a, target.rsplit(".", 2)[-2])
                        p[off[shard]:off[shard + 1]].copy_(tensor)
                loaded.add(f"{target}#{shard}")
    expected = set()
    for n in params:
        if n.endswith(("qkv_proj.weight", "qkv_proj.bias")):
            expected |= {f"{n}#{i}" for i in range(3)}
        elif n.endswith("gate_up_proj.weight") or n.endswith("gate_up_proj.bias"):
            expected |= {f"{n}#{i}" for i in range(2)}
        else:
            expected.add(f"{n}#None")
    missing = expected - loaded
    if missing:
        raise ValueError(f"{path}: checkpoint is missing weights: {sorted(missing)[:5]}")


def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Random weights in the checkpoint's shapes: speed does not depend on values."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or "layernorm" in n:
                p.fill_(1.0)
            elif n.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)


def build_model(path: str, device: torch.device, dtype: torch.dtype, dummy: bool = False,
                seed: int = 0) -> tuple[LlamaForCausalLM, dict]:
    cfg = read_config(path)
    arch = arch_from_config(cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(arch)
    model = model.to_empty(device=device).to(dtype)
    if dummy:
        init_dummy_weights(model, seed)
    else:
        load_weights(model, path)
    model.eval()
    return model, cfg
