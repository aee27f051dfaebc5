"""Build real PEFT adapters (saved by peft itself) for tests, on a tiny Llama or on any given base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# module -> (out_features, in_features) of the tiny base
TINY_SHAPES = {
    "q_proj": (32, 32),
    "k_proj": (16, 32),
    "v_proj": (16, 32),
    "o_proj": (32, 32),
    "gate_proj": (64, 32),
    "up_proj": (64, 32),
    "down_proj": (32, 64),
}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def preset_llama(preset: str = "tiny") -> LlamaForCausalLM:
    """transformers' Llama with random weights, shaped as hotlora's `random:<preset>`."""
    from hotlora.server.model.presets import preset_hf_config

    return LlamaForCausalLM(LlamaConfig(**{k: v for k, v in preset_hf_config(preset).items() if k != "architectures"}))


def save_adapters_by_spec(base: torch.nn.Module, root: Path, specs: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """One adapter per name under root, saved by peft on base with its LoraConfig fields (seed = its index)."""
    return {name: save_adapter(base, root / name, seed=i, **spec) for i, (name, spec) in enumerate(specs.items())}


def save_adapter(base: torch.nn.Module, out: Path, seed: int = 0, **lora: Any) -> Path:
    """get_peft_model with random non-zero A and B (init_lora_weights=False), save_pretrained to `out`."""
    torch.manual_seed(seed)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(str(out))
    model.unload()  # restore `base` so that the next adapter is built on a clean model
    return Path(out)


# Adapters of the server tests, saved on the default model (SmolLM2-135M): name -> LoraConfig fields.
SERVER_ADAPTER_SPECS: dict[str, dict[str, Any]] = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    "c": dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
    "x": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "y": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "big": dict(r=32, lora_alpha=32, target_modules=["q_proj"]),  # above the servers' max_lora_rank 16
}


def server_adapters(model_dir: Path, root: Path) -> dict[str, Path]:
    """SERVER_ADAPTER_SPECS saved by peft on the model in `model_dir`, plus "tiny": an adapter of the
    tiny Llama, whose shapes no real base model accepts."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    dirs = {
        name: save_adapter(base, root / name, seed=i + 1, **spec)
        for i, (name, spec) in enumerate(SERVER_ADAPTER_SPECS.items())
    }
    dirs["tiny"] = save_adapter(tiny_llama(), root / "tiny", seed=9)
    return dirs
