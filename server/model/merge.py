"""Merge an adapter, or a weighted mix, into the base's unquantized weights and write a plain HF folder.

    W' = W + scale * B @ A                                        one adapter (PEFT's merge_and_unload)
    W' = W + B_cat @ A_cat,  A_cat = cat_i(A_i * w_i * scale_i)   a mix (add_weighted_adapter "cat", then
                                                                   merge_and_unload; compose.py)

computed in float32 the way PEFT computes it, from the base's own weights (a local folder, or the
cached conversion of the default model / a GGUF; never the NF4 copy), then cast to the output dtype.
The folder (config.json, model.safetensors or model-0000i-of-0000n.safetensors shards + index,
tokenizer files, generation_config.json) loads with AutoModelForCausalLM.from_pretrained and serves
with `hotlora serve --model DIR`. It is written into a hidden temporary folder beside DIR and renamed
into place, so DIR never holds half a model; tensors stream through one shard at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hotlora.adapters.compose import cat_lora
from hotlora.adapters.mixspec import is_mix, parse_mix
from hotlora.adapters.peft_format import AdapterError, LoraAdapter, check_compatible, load_peft_adapter, module_path

from .weights import Checkpoint, expected_shapes

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MAX_SHARD_BYTES = 2 << 30
# what a model folder holds besides weights and config.json that a merged copy keeps
_EXTRA_FILES = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                "vocab.*", "merges.txt", "chat_template*", "preprocessor_config.json")
_TMP_PREFIX = ".hotlora-merge-"


class MergeError(ValueError):
    """A merge that cannot be done as asked (an existing output folder, a bad dtype); the message says why."""


@dataclass(slots=True)
class MergePlan:
    """What to merge: adapters with their mix weights. mixed=False: one adapter merged as PEFT merges one
    (scale * B @ A); True: the "cat" mix of all of them (a one-component mix is still a mix)."""

    adapters: list[LoraAdapter]
    weights: list[float]
    mixed: bool

    def delta(self, layer: int, module: str) -> torch.Tensor | None:
        """The float32 delta of W [out, in] at (layer, module); None if no adapter targets it."""
        key = (layer, module)
        if not self.mixed:
            (adapter,) = self.adapters
            ab = adapter.weights.get(key)
            return None if ab is None else (ab[1].float() @ ab[0].float()) * adapter.config.scale
        parts = [(a.weights, a.config, w) for a, w in zip(self.adapters, self.weights, strict=True)]
        cat = cat_lora(parts, key)
        if cat is None:
            return None
        # PEFT's mix holds all R rows in every module it targets, zeros past the ones that module uses
        rank = sum(a.config.rank for a in self.adapters)
        a = torch.zeros(rank, cat[0].shape[1])
        b = torch.zeros(cat[1].shape[0], rank)
        a[: cat[0].shape[0]], b[:, : cat[1].shape[1]] = cat
        return b @ a


def merge(model: str, adapter: str, out: Path, dtype: str | None = None, force: bool = False,
          cache_dir: Path | None = None, adapter_dir: Path | None = None, progress: bool = True) -> Path:
    """`hotlora merge`: resolve the base and NAME_OR_FOLDER_OR_MIX, merge, write `out`; returns `out`."""
    from .weights import default_cache_dir, resolve_checkpoint

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    check_out(Path(out), force)  # before the model is converted or anything is read
    folders, weights = resolve_adapters(adapter, Path(adapter_dir) if adapter_dir else cache / "adapters")
    ckpt = resolve_checkpoint(model, cache, progress=progress)
    plan = load_plan(ckpt, folders, weights)
    return merge_to_folder(ckpt, plan, out, dtype or base_dtype(ckpt), force, progress)


def load_plan(ckpt: Checkpoint, folders: list[Path], weights: list[float] | None) -> MergePlan:
    """Read and validate the adapters (every shape against the base); weights None: one plain adapter."""
    cfg = ckpt.config
    adapters = []
    for folder in folders:
        adapter = load_peft_adapter(folder, folder.name)
        check_compatible(adapter, cfg.linear_shapes(), cfg.num_layers, max_rank=1 << 30)
        adapters.append(adapter)
    return MergePlan(adapters, weights or [1.0], weights is not None)


def resolve_adapters(text: str, store: Path) -> tuple[list[Path], list[float] | None]:
    """The folders NAME_OR_FOLDER_OR_MIX names: a PEFT folder, an adapter in the store, or a mix of
    adapters in the store ("sql*0.7+chat*0.3"); mix weights, or None for one plain adapter."""
    if Path(text).expanduser().is_dir():
        return [Path(text).expanduser()], None
    if not is_mix(text):
        return [_stored(store, text)], None
    spec = parse_mix(text)
    return [_stored(store, n) for n in spec.names], [c.weight for c in spec.components]


def _stored(store: Path, name: str) -> Path:
    folder = store / name
    if "/" in name or not folder.is_dir():
        raise AdapterError(f"adapter {name!r} is neither a folder nor an adapter in the store {store}")
    return folder.resolve()


def base_dtype(ckpt: Checkpoint) -> str:
    """The dtype the base's config.json names (float32 when it names none we write)."""
    cfg = _hf_config(ckpt)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MergeError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MergeError(f"{out} is not empty; pass --force to replace it")


def merge_to_folder(ckpt: Checkpoint, plan: MergePlan, out: Path, dtype: str, force: bool = False,
                    progress: bool = True) -> Path:
    """Write the merged model to `out` (atomically); returns `out`."""
    if dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out).absolute()
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{_TMP_PREFIX}{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_weights(ckpt, plan, tmp, DTYPES[dtype], progress)
        _write_side_files(ckpt, tmp, dtype)
        _fsync_folder(tmp)
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _merged_tensors(ckpt: Checkpoint, plan: MergePlan, dtype: torch.dtype):
    targets = {module_path(layer, m) + ".weight": (layer, m)
               for layer in range(ckpt.config.num_layers) for m in ckpt.config.linear_shapes()}
    for name, t in ckpt.tensors("cpu", torch.float32):
        if name in targets:
            delta = plan.delta(*targets[name])
            if delta is not None:
                t = t + delta
        yield name, t.to(dtype).contiguous()


def _write_weights(ckpt: Checkpoint, plan: MergePlan, folder: Path, dtype: torch.dtype, progress: bool) -> None:
    """Shards of at most MAX_SHARD_BYTES (planned from the shapes first, so their names are final)."""
    shapes = expected_shapes(ckpt.config)
    size = {n: torch.Size(s).numel() * dtype.itemsize for n, s in shapes.items()}
    shards: list[list[str]] = [[]]
    used = 0
    for name in shapes:
        if shards[-1] and used + size[name] > MAX_SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size[name]
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    where = {n: f for f, names in zip(files, shards, strict=True) for n in names}
    bar = tqdm(total=sum(size.values()), unit="B", unit_scale=True, desc="merging", disable=not progress)
    pending: dict[str, torch.Tensor] = {}
    with bar:
        for name, t in _merged_tensors(ckpt, plan, dtype):
            pending[name] = t
            bar.update(size[name])
            if len(pending) == len(shards[files.index(where[name])]):
                save_file(pending, str(folder / where[name]), metadata={"format": "pt"})
                pending = {}
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(size.values())}, "weight_map": where}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _hf_config(ckpt: Checkpoint) -> dict:
    if ckpt.path is not None:
        return json.loads((ckpt.path / "config.json").read_text())
    from .presets import preset_hf_config

    return preset_hf_config(ckpt.config.name.split(":")[1])


def _write_side_files(ckpt: Checkpoint, folder: Path, dtype: str) -> None:
    """config.json (naming the written dtype, no quantization settings) and the tokenizer and generation files."""
    cfg = _hf_config(ckpt)
    cfg.pop("quantization_config", None)
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for source in dict.fromkeys(d for d in (ckpt.path, ckpt.tokenizer_dir) if d is not None):
        for pattern in _EXTRA_FILES:
            for f in source.glob(pattern):
                if f.is_file() and not (folder / f.name).exists():
                    shutil.copyfile(f, folder / f.name)
    if not (folder / "generation_config.json").exists():
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _fsync_folder(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder into place; a replaced folder is renamed aside first, then removed."""
    old = None
    if out.exists():
        check_out(out, force)  # it may have filled up while we wrote
        old = out.parent / f"{_TMP_PREFIX}{out.name}-old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
