"""The model's shape, read from a Hugging Face config.json (or a preset), validated once.

Only the Llama family is supported: the engine has one forward pass for it. Anything else is refused
here, before a single weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# GGUF-derived configs carry only model_type, not architectures.
_MODEL_TYPES = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
# Rope variants the forward pass implements (None/"default" = plain rope).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnsupportedModelError(ValueError):
    """The checkpoint is not a model hotlora can run (wrong architecture or an unsupported feature)."""

    def __init__(self, what: str) -> None:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        super().__init__(f"{what}; hotlora supports only these architectures: {supported}")


@dataclass(slots=True)
class ModelConfig:
    name: str
    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # HF rope_scaling dict (has "rope_type"), None for plain rope
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v bias (qwen2); o_proj never has one
    sliding_window: int | None  # mistral; recorded, the engine may refuse prompts beyond it
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: str | None = None  # the checkpoint's stored dtype ("bfloat16", "float32", ...), if known

    def __post_init__(self) -> None:
        if self.architecture not in _MODEL_TYPES:
            raise UnsupportedModelError(f"architecture {self.architecture!r} is not supported")
        for attr in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"{attr} must be positive, got {getattr(self, attr)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"rope scaling {self.rope_scaling!r} is not supported")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """module -> (out_features, in_features) of the seven decoder projections."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (self.q_size, h),
            "k_proj": (self.kv_size, h),
            "v_proj": (self.kv_size, h),
            "o_proj": (h, self.q_size),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str,
                       generation_config: dict[str, Any] | None = None) -> ModelConfig:
        """Validate a config.json dict (transformers 4 or 5 layout). generation_config may add EOS ids."""
        architecture = _architecture(cfg)
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {cfg['hidden_act']!r} (only silu)")
        if cfg.get("mlp_bias", False):
            raise UnsupportedModelError("mlp_bias=True")
        if architecture != "qwen2" and cfg.get("attention_bias", False):
            raise UnsupportedModelError("attention_bias=True on a llama/mistral model (o_proj bias)")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope_theta, rope_scaling = _rope(cfg)
        return cls(
            name=name,
            architecture=architecture,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=architecture == "qwen2",
            sliding_window=_sliding_window(cfg, architecture),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_eos_ids(cfg, generation_config),
            dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )


def _architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    if archs:
        raise UnsupportedModelError(f"architecture {archs[0]!r} is not supported")
    model_type = cfg.get("model_type")
    if model_type in _MODEL_TYPES:
        return model_type
    raise UnsupportedModelError(f"model_type {model_type!r} is not supported")


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(cfg.get("rope_theta") or params.pop("rope_theta", None) or 10000.0)
    params.pop("rope_theta", None)
    scaling = cfg.get("rope_scaling") or (params if params else None)
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    return theta, scaling


def _sliding_window(cfg: dict[str, Any], architecture: str) -> int | None:
    window = cfg.get("sliding_window")
    if architecture == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    if architecture == "llama":
        return None
    return int(window) if window else None


def _eos_ids(cfg: dict[str, Any], generation_config: dict[str, Any] | None) -> list[int]:
    ids: list[int] = []
    for source in (cfg, generation_config or {}):
        eos = source.get("eos_token_id")
        for i in eos if isinstance(eos, list) else [eos]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids
