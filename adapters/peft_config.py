"""adapter_config.json: parse it and refuse, with a clear AdapterError, every setting the engine cannot honour.

Target matching follows PEFT's check_target_module_exists (a list matches a module name or a dotted
suffix of it; a string is a regex over the full module name; layers_to_transform/layers_pattern and
exclude_modules are honoured), restricted to the seven decoder projections.

A regex from a config runs on RE2 (google-re2), a linear-time engine: no pattern can make matching hang
(Python's `re` backtracks, and "(.*)*X" would hold the GIL for ever). Patterns RE2 cannot run
(backreferences, lookaround) and patterns above MAX_PATTERN_CHARS are refused with an AdapterError.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re2

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20
_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max

PARENT = {m: "self_attn" for m in TARGET_MODULES[:4]} | {m: "mlp" for m in TARGET_MODULES[4:]}
# PEFT's default for Llama/Mistral/Qwen2 when target_modules is null.
_DEFAULT_TARGETS = ("q_proj", "v_proj")
# Fields that change the computation in ways the engine does not implement: they must be falsy.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora) is not supported",
    "lora_bias": "LoRA bias (lora_bias) is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable_token_indices (embedding token training) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "megatron_config": "Megatron-parallel LoRA (megatron_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights) is not supported",
}
# Initialisations that rewrite the base weights: the adapter only works on that modified base.
_BASE_MUTATING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")
_FORBIDDEN_NAMES = ("model.embed_tokens", "lm_head", "model.norm")
PROBE_LAYERS = 256  # how many layer indices a regex target is probed over before the base is known
MAX_PATTERN_CHARS = 1024
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is the user's error: no absl log lines on stderr
_RE2_OPTIONS.max_mem = 8 << 20  # bounds the compiled program of a huge pattern (such as "a{1000}{1000}")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message is meant for the user who supplied it."""


def module_path(layer: int, module: str) -> str:
    """The module's name inside a Llama-family *ForCausalLM, as PEFT matches target_modules against."""
    return f"model.layers.{layer}.{PARENT[module]}.{module}"


@dataclass(slots=True)
class AdapterConfig:
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: frozenset[str]  # which of TARGET_MODULES the adapter touches (in at least one layer)
    base_model: str | None
    # PEFT's matching inputs, kept so that targets() can say exactly which (layer, module) pairs exist.
    target_spec: str | tuple[str, ...] = ()
    exclude_spec: str | tuple[str, ...] = ()
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = field(default_factory=tuple)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def matches(self, layer: int, module: str) -> bool:
        """PEFT's check_target_module_exists, restricted to the decoder projections."""
        key = module_path(layer, module)
        if _spec_matches(self.exclude_spec, key):
            return False
        if isinstance(self.target_spec, str):
            return _regex(self.target_spec).fullmatch(key) is not None
        if not _spec_matches(self.target_spec, key):
            return False
        if self.layers_to_transform is None:
            return True
        return _layer_index(key, self.layers_pattern) in self.layers_to_transform

    def targets(self, num_layers: int) -> frozenset[tuple[int, str]]:
        """The (layer, module) pairs PEFT would wrap; cached by the matching inputs, since a cold load asks
        for every adapter and thousands of adapters share a handful of configs (uncached: ~25 ms of regex
        matching per load, on the loading thread, holding the GIL)."""
        return _targets(self.target_spec, self.exclude_spec, self.layers_to_transform, self.layers_pattern,
                        num_layers)


@functools.lru_cache(maxsize=64)
def _targets(target_spec: str | tuple[str, ...], exclude_spec: str | tuple[str, ...],
             layers: tuple[int, ...] | None, patterns: tuple[str, ...], num_layers: int
             ) -> frozenset[tuple[int, str]]:
    probe = AdapterConfig(0, 0.0, False, frozenset(), None, target_spec, exclude_spec, layers, patterns)
    return frozenset((i, m) for i in range(num_layers) for m in TARGET_MODULES if probe.matches(i, m))


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> Any:
    """The RE2 program of a pattern already accepted by safe_regex()."""
    return re2.compile(pattern, _RE2_OPTIONS)


def safe_regex(pattern: str, key: str) -> Any:
    """Compile a user's regex on RE2, or refuse it with an AdapterError naming the field."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise _fail(f"{key} regex is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} are accepted")
    try:
        return _regex(pattern)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise _fail(
            f"{key} regex {pattern!r} does not compile on RE2: {reason} (a linear-time engine, "
            "without backreferences or lookaround, keeps matching bounded)"
        ) from None


def _spec_matches(spec: str | tuple[str, ...], key: str) -> bool:
    if isinstance(spec, str):
        return bool(spec) and _regex(spec).fullmatch(key) is not None
    return any(key == s or key.endswith("." + s) for s in spec)


def _layer_index(key: str, patterns: tuple[str, ...]) -> int | None:
    if not patterns:
        match = _regex(r".*?\.[^.]*\.(?P<idx>\d+)\.").match(key)
    else:
        match = None
        for pattern in patterns:
            match = _regex(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.").match(key)
            if match:
                break
    return int(match["idx"]) if match else None


def _fail(msg: str) -> AdapterError:
    return AdapterError(msg)


def _load_json(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise _fail(f"{CONFIG_NAME} is missing in the adapter folder")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise _fail(f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: deep nesting
        raise _fail(f"{CONFIG_NAME} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise _fail(f"{CONFIG_NAME} must hold a JSON object")
    return raw


def _check_supported(raw: dict[str, Any]) -> None:
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise _fail(f"peft_type must be 'LORA', got {peft_type!r}")
    task = raw.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise _fail(f"task_type must be CAUSAL_LM (or null), got {task!r}")
    for key, msg in _UNSUPPORTED_FIELDS.items():
        if raw.get(key):
            raise _fail(f"{msg} (adapter_config.json has {key}={raw[key]!r})")
    bias = raw.get("bias", "none")
    if bias != "none":
        raise _fail(f"bias must be 'none' (trained biases are not supported), got {bias!r}")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise _fail(
            f"init_lora_weights={init!r} modifies the base model's weights, so this adapter only works on "
            "that modified base; convert it with PEFT's path_initial_model_for_weight_conversion first"
        )


def _number(raw: dict[str, Any], key: str, default: Any = None) -> Any:
    """A finite number within float32's range: the kernels' scale is float32, and alpha / r (or / sqrt(r)) is
    never larger than alpha for r >= 1 (1e308 held a device slot forever: its scale's write failed)."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= _FLOAT32_MAX:
        shown = f"{value!r}"[:40]  # an integer literal may have thousands of digits
        raise _fail(f"{key} must be a finite number within float32's range, got {shown}")
    return value


def _str_tuple(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) and v for v in value):
        raise _fail(f"{key} must be a string or a list of non-empty strings, got {value!r}")
    return tuple(value)


def _target_spec(raw: dict[str, Any]) -> str | tuple[str, ...]:
    spec = raw.get("target_modules")
    if spec is None:
        return _DEFAULT_TARGETS
    if isinstance(spec, str):
        if spec == "all-linear":
            return TARGET_MODULES
        regex = safe_regex(spec, "target_modules")
        for name in _FORBIDDEN_NAMES:
            if regex.fullmatch(name):
                raise _fail(
                    f"target_modules {spec!r} matches {name}: only {', '.join(TARGET_MODULES)} can carry LoRA weights"
                )
        return spec
    entries = _str_tuple(spec, "target_modules")
    for entry in entries:
        if entry.rsplit(".", 1)[-1] not in TARGET_MODULES:
            raise _fail(
                f"target module {entry!r} is not supported: only {', '.join(TARGET_MODULES)} "
                "can carry LoRA weights (no embed_tokens, lm_head or other modules)"
            )
    return entries


def _exclude_spec(raw: dict[str, Any]) -> str | tuple[str, ...]:
    spec = raw.get("exclude_modules")
    if not spec:
        return ()
    if isinstance(spec, str):
        safe_regex(spec, "exclude_modules")
        return spec
    return _str_tuple(spec, "exclude_modules")


def _layers(raw: dict[str, Any]) -> tuple[tuple[int, ...] | None, tuple[str, ...]]:
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and (
        not isinstance(layers, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
    ):
        raise _fail(f"layers_to_transform must be an int or a list of non-negative ints, got {layers!r}")
    if layers is not None and not layers:
        layers = None  # PEFT treats an empty list as "every layer"
    pattern = raw.get("layers_pattern") or ()
    patterns = (pattern,) if isinstance(pattern, str) else _str_tuple(pattern, "layers_pattern")
    if layers is None and patterns:
        raise _fail("layers_pattern is only meaningful together with layers_to_transform")
    for pattern in patterns:
        safe_regex(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", "layers_pattern")
    return (tuple(layers) if layers is not None else None), patterns


def read_adapter_config(folder: Path) -> AdapterConfig:
    """Parse and validate adapter_config.json only (no weights are read)."""
    raw = _load_json(Path(folder))
    _check_supported(raw)
    rank = raw.get("r", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise _fail(f"r (the LoRA rank) must be a positive integer, got {rank!r}")
    alpha = float(_number(raw, "lora_alpha", 8))
    rslora = raw.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise _fail(f"use_rslora must be true or false, got {rslora!r}")
    base = raw.get("base_model_name_or_path")
    layers, patterns = _layers(raw)
    cfg = AdapterConfig(
        rank=rank,
        alpha=alpha,
        use_rslora=rslora,
        target_modules=frozenset(),
        base_model=base if isinstance(base, str) else None,
        target_spec=_target_spec(raw),
        exclude_spec=_exclude_spec(raw),
        layers_to_transform=layers,
        layers_pattern=patterns,
    )
    cfg.target_modules = frozenset(m for _, m in cfg.targets(PROBE_LAYERS))
    if not cfg.target_modules:
        raise _fail(f"target_modules selects none of the supported projections ({', '.join(TARGET_MODULES)})")
    return cfg
