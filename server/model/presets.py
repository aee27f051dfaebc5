"""`random:<preset>`: real architectures with random (seeded) weights, for tests and GPU benchmarks.

They use the default model's tokenizer, so their BOS/EOS ids are that tokenizer's, and every vocabulary
is at least its 49152 ids (the one change from the real shapes: mistral-7b's 32000 becomes 49152).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import SUPPORTED_ARCHITECTURES, ModelConfig

log = logging.getLogger(__name__)

DEFAULT_TOKENIZER_VOCAB = 49152  # SmolLM2's tokenizer
_DEFAULT_TOKENIZER_IDS = {"bos_token_id": 1, "eos_token_id": 2}  # <|im_start|>, <|im_end|>

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {  # llama, GQA 4:2, untied lm_head
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    },
    "tiny-qwen2": {  # q/k/v bias, tied embeddings
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 1000000.0, "max_position_embeddings": 2048, "tie_word_embeddings": True,
    },
    "tiny-mistral": {  # sliding window recorded
        "architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
        "rope_theta": 10000.0, "max_position_embeddings": 2048, "sliding_window": 1024,
        "tie_word_embeddings": False,
    },
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rope_theta": 100000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama-3-8b": {  # Llama-3.1-8B shape
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    },
    "mistral-7b": {  # Mistral-7B-v0.1 shape (vocab raised from 32000, see above)
        "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rope_theta": 10000.0, "max_position_embeddings": 32768, "sliding_window": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    },
}


def preset_hf_config(preset: str) -> dict[str, Any]:
    """The preset as a config.json dict (what transformers would build the same model from)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown random preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = {"vocab_size": DEFAULT_TOKENIZER_VOCAB, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
           "hidden_act": "silu", **_DEFAULT_TOKENIZER_IDS, **PRESETS[preset]}
    cfg["vocab_size"] = max(cfg["vocab_size"], DEFAULT_TOKENIZER_VOCAB)
    cfg["model_type"] = SUPPORTED_ARCHITECTURES[cfg["architectures"][0]]
    return cfg


def preset_config(preset: str) -> ModelConfig:
    return ModelConfig.from_hf_config(preset_hf_config(preset), f"random:{preset}")


def random_checkpoint(spec: str, cache_dir: Path, progress: bool = True):  # -> weights.Checkpoint
    """spec: "<preset>" or "<preset>:<seed>"."""
    from .weights import Checkpoint

    preset, _, seed = spec.partition(":")
    config = preset_config(preset)
    return Checkpoint(config=config, tokenizer_dir=default_tokenizer_dir(cache_dir, progress), path=None,
                      seed=int(seed) if seed else 0)


def default_tokenizer_dir(cache_dir: Path, progress: bool = True) -> Path | None:
    """The default model's tokenizer (its converted folder, or a tokenizer-only conversion)."""
    from .convert import convert_gguf_tokenizer
    from .weights import default_gguf_path

    try:
        gguf = default_gguf_path()
    except FileNotFoundError as e:
        log.warning("random model without a tokenizer: %s", e)
        return None
    return convert_gguf_tokenizer(gguf, cache_dir, progress)
