"""Read and validate a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors); write one.

Everything the engine cannot honour is refused with an AdapterError whose message names the
offending field, key or shape; nothing is silently ignored. Pickled weights (.bin/.pt) are never read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from hotlora.adapters.gilyield import yielding
from hotlora.adapters.peft_config import (
    CONFIG_NAME,
    PARENT,
    PROBE_LAYERS,
    TARGET_MODULES,
    AdapterConfig,
    AdapterError,
    module_path,
    read_adapter_config,
)

__all__ = [
    "CONFIG_NAME",
    "PICKLE_SUFFIXES",
    "TARGET_MODULES",
    "WEIGHTS_NAME",
    "AdapterConfig",
    "AdapterError",
    "LoraAdapter",
    "adapter_from_tensors",
    "check_compatible",
    "load_peft_adapter",
    "lora_weight_key",
    "max_adapter_bytes",
    "module_path",
    "read_adapter_config",
    "read_weights_file",
    "write_peft_folder",
]

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<module>\w+)"
    r"\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)


@dataclass
class LoraAdapter:
    name: str
    config: AdapterConfig
    # (layer index, module) -> (A [r, in_features], B [out_features, r]), as stored, on CPU.
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    nbytes: int  # bytes of all A and B tensors as stored (host-memory footprint)
    sha256: str  # hex digest of adapter_model.safetensors
    path: Path | None


def _fail(msg: str) -> AdapterError:
    return AdapterError(msg)


def read_weights_file(folder: Path) -> bytes:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise _fail(
                f"{', '.join(pickles)}: pickled weights are never loaded (they can run code); "
                f"save the adapter with save_pretrained(..., safe_serialization=True) to get {WEIGHTS_NAME}"
            )
        raise _fail(f"{WEIGHTS_NAME} is missing in the adapter folder")
    return path.read_bytes()


def _parse_key(key: str) -> tuple[int, str, str]:
    match = _KEY_RE.match(key)
    if match is None or match["module"] not in TARGET_MODULES or match["parent"] != PARENT[match["module"]]:
        raise _fail(
            f"unexpected tensor {key!r}: only lora_A/lora_B weights of "
            f"{', '.join(TARGET_MODULES)} in model.layers.N are supported"
        )
    return int(match["layer"]), match["module"], match["ab"]


_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(key: str, t: torch.Tensor, ab: str, rank: int, check_finite: bool = True) -> None:
    if t.dtype not in _WEIGHT_DTYPES:  # float8 among others: no finiteness check, no cast path for it
        raise _fail(f"tensor {key!r} has dtype {t.dtype}; LoRA weights must be floating point: "
                    "float16, bfloat16, float32 or float64")
    if t.dim() != 2:
        raise _fail(f"tensor {key!r} has shape {tuple(t.shape)}; LoRA weights must be 2-D")
    r = t.shape[0] if ab == "A" else t.shape[1]
    if r != rank:
        raise _fail(
            f"tensor {key!r} has shape {tuple(t.shape)}: rank {r} does not match r={rank} in adapter_config.json"
        )
    if check_finite and not bool(torch.isfinite(t).all()):
        raise _fail(f"tensor {key!r} contains NaN or infinite values")


def _collect_weights(
    tensors: dict[str, torch.Tensor], rank: int, check_finite: bool = True
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in yielding(tensors.items()):  # a reading thread's loop: let the engine thread in
        layer, module, ab = _parse_key(key)
        _check_tensor(key, tensor, ab, rank, check_finite)
        slot = halves.setdefault((layer, module), {})
        if ab in slot:
            raise _fail(f"tensor {key!r} duplicates lora_{ab} of layer {layer} {module}")
        slot[ab] = tensor
    weights = {}
    for (layer, module), slot in sorted(halves.items()):
        missing = {"A", "B"} - slot.keys()
        if missing:
            raise _fail(f"layer {layer} {module} has no lora_{missing.pop()} weight (A and B come in pairs)")
        weights[(layer, module)] = (slot["A"], slot["B"])
    if not weights:
        raise _fail(f"{WEIGHTS_NAME} holds no LoRA weights")
    return weights


def _check_aligned(blob: bytes, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor must start at a multiple of its element size in the file, as safetensors' own writers pad the
    header to make it: a cold load (adapters/staging.py) views the tensors in place in the file's bytes, and
    refuses one that is not, so an upload that is not would be served until the next load from disk."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    for key, t in tensors.items():
        if (8 + size + int(header[key]["data_offsets"][0])) % t.element_size():
            raise _fail(f"tensor {key!r} is not aligned in {WEIGHTS_NAME} (its header is not padded); save it "
                        "again with safetensors, e.g. peft's save_pretrained")


def load_peft_adapter(folder: Path, name: str, blob: bytes | None = None) -> LoraAdapter:
    """Read a PEFT LoRA folder into CPU tensors; validates everything that does not need the base model.

    `blob`: the weights file's bytes when the caller read them already (to time the read apart)."""
    folder = Path(folder)
    if blob is None:
        read_adapter_config(folder)  # a bad config is reported before a missing weights file
        blob = read_weights_file(folder)
    try:
        tensors = load_safetensors_bytes(blob)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers/data
        raise _fail(f"{WEIGHTS_NAME} is not a valid safetensors file: {exc}") from None
    _check_aligned(blob, tensors)
    return adapter_from_tensors(folder, name, tensors, sha256=hashlib.sha256(blob).hexdigest())


def adapter_from_tensors(folder: Path, name: str, tensors: dict[str, torch.Tensor], check_finite: bool = True,
                         sha256: str = "") -> LoraAdapter:
    """Validate the tensors of `folder`'s weights file against its adapter_config.json (finiteness
    only if `check_finite`: a caller that skips it checks on the device). Without check_finite a tensor may
    be anything with its shape, dim(), is_floating_point() and nbytes (staging.Span: the file's header)."""
    config = read_adapter_config(folder)
    weights = _collect_weights(tensors, config.rank, check_finite)
    probed = config.targets(PROBE_LAYERS)  # cached per config: a set lookup per weight, not a regex match
    for layer, module in weights:
        if (layer, module) not in probed and not config.matches(layer, module):
            raise _fail(
                f"{WEIGHTS_NAME} has weights for layer {layer} {module}, which adapter_config.json's "
                "target_modules/layers_to_transform do not select"
            )
    config.target_modules = frozenset(m for _, m in weights)
    nbytes = sum(a.nbytes + b.nbytes for a, b in weights.values())
    return LoraAdapter(name=name, config=config, weights=weights, nbytes=nbytes, sha256=sha256, path=folder)


def max_adapter_bytes(linear_shapes: dict[str, tuple[int, int]], num_layers: int, max_rank: int) -> int:
    """The largest adapter_model.safetensors an acceptable adapter can be for this base: rank max_rank on
    every projection of every layer, in float64 (the widest float safetensors holds), plus headers."""
    params = num_layers * max_rank * sum(out_f + in_f for out_f, in_f in linear_shapes.values())
    return params * 8 + (1 << 20)


def finite_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whether every value of `t` is finite in `dtype` (a 0-d bool tensor, on t's device): a narrowing cast can
    overflow (a float64 1e300 in float32, a float32 1e5 in float16), so its result is what is checked."""
    if torch.finfo(dtype).max < torch.finfo(t.dtype).max:
        t = t.to(dtype)
    return torch.isfinite(t).all()


def check_finite_as(adapter: LoraAdapter, dtype: torch.dtype) -> None:
    """Refuse weights that are finite as stored but not in `dtype`, the pools': the device-side check of a cold
    load (adapters/poolwrite.py) does the same, and an upload's tensors are served without one."""
    for (layer, module), pair in adapter.weights.items():
        for side, t in zip("AB", pair, strict=True):
            if not bool(finite_as(t, dtype)):
                raise _fail(f"layer {layer} {module} lora_{side}: weights overflow the server's {dtype} adapter "
                            "pools (finite as stored, infinite there)")


def check_compatible(
    adapter: LoraAdapter, linear_shapes: dict[str, tuple[int, int]], num_layers: int, max_rank: int
) -> None:
    """Refuse an adapter that does not fit the base. linear_shapes: module -> (out_features, in_features)."""
    cfg = adapter.config
    if cfg.rank > max_rank:
        raise _fail(
            f"rank r={cfg.rank} is above the server's maximum LoRA rank {max_rank} (raise it with --max-lora-rank)"
        )
    for (layer, module), (a, b) in adapter.weights.items():
        if layer >= num_layers:
            raise _fail(f"weights for layer {layer} {module}, but the base model has {num_layers} layers")
        if module not in linear_shapes:
            raise _fail(f"the base model has no {module} projection")
        out_f, in_f = linear_shapes[module]
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise _fail(
                f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"the base projection ({out_f} out x {in_f} in); was it trained on another base model?"
            )
    missing = sorted(cfg.targets(num_layers) - adapter.weights.keys())
    if missing:
        layer, module = missing[0]
        raise _fail(
            f"layer {layer} {module} is selected by target_modules but has no LoRA weights "
            f"({len(missing)} targeted module(s) missing)"
        )


def lora_weight_key(layer: int, module: str, side: str) -> str:
    """The name PEFT saves a Llama-family layer's lora_A or lora_B weight under (side "A" or "B")."""
    return f"base_model.model.{module_path(layer, module)}.lora_{side}.weight"


def write_peft_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """`folder` as PeftModel.save_pretrained writes it: the weights (safetensors sorts their names) and
    adapter_config.json; for synthetic adapters (benchmarks, the copy-path warm-up)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
