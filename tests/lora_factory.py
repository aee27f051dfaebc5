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
