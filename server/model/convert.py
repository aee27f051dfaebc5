"""GGUF -> a cached Hugging Face folder (safetensors + config + tokenizer with its chat template).

transformers' GGUF support dequantizes the file (it reverses llama.cpp's q/k permutation too); we write
what it loaded, so the folder equals `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`.
The conversion runs once per file: it writes into a hidden temp folder and renames it into place, so
an interrupted run leaves no half-written model, and later starts just load the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import SUPPORTED_ARCHITECTURES, ModelConfig

CONVERTER_VERSION = 1  # bump when the folder layout changes: old cache entries are then ignored
_HASH_SPAN = 8 << 20  # bytes hashed at each end of the file (with its size): cheap for an 8 GB file
_ARCH_OF_TYPE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}


def gguf_key(gguf: Path) -> str:
    """A content key of the file: size + sha256 of its first and last 8 MiB (header and last tensors)."""
    size = gguf.stat().st_size
    h = hashlib.sha256(f"hotlora-gguf-v{CONVERTER_VERSION}:{size}:".encode())
    with open(gguf, "rb") as f:
        h.update(f.read(_HASH_SPAN))
        f.seek(max(0, size - _HASH_SPAN))
        h.update(f.read(_HASH_SPAN))
    return h.hexdigest()[:16]


def cache_folder(gguf: Path, cache_dir: Path, suffix: str = "") -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf.stem)
    return Path(cache_dir) / f"{stem}-{gguf_key(gguf)}{suffix}"


def convert_gguf(gguf: Path, cache_dir: Path, progress: bool = True) -> Path:
    """The cached HF folder of `gguf`, converting it first if needed."""
    final = cache_folder(gguf, cache_dir)
    return _build_once(final, lambda tmp: _convert_into(gguf, tmp, progress), progress)


def convert_gguf_tokenizer(gguf: Path, cache_dir: Path, progress: bool = True) -> Path:
    """Only the tokenizer of `gguf` (for random-weight models), or the full conversion if already there."""
    full = cache_folder(gguf, cache_dir)
    if full.is_dir():
        return full
    final = cache_folder(gguf, cache_dir, "-tokenizer")
    return _build_once(final, lambda tmp: _write_tokenizer(gguf, tmp), progress)


def _build_once(final: Path, build: Callable[[Path], None], progress: bool) -> Path:
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final.parent)
    tmp = final.parent / f".tmp-{os.getpid()}-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        start = time.perf_counter()
        build(tmp)
        if progress:
            tqdm.write(f"hotlora: converted into {final} in {time.perf_counter() - start:.1f} s")
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a concurrent conversion winning the race is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_temps(cache_dir: Path) -> None:
    """Temp folders of conversions whose process died (killed -9, power loss)."""
    for tmp in cache_dir.glob(".tmp-*"):
        pid = tmp.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _transformers_quiet(progress: bool) -> Iterator[None]:
    os.environ["HF_HUB_OFFLINE"] = "1"  # local files only, never the hub
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert_into(gguf: Path, out: Path, progress: bool) -> None:
    steps = tqdm(total=4, desc=f"converting {gguf.name}", unit="step", disable=not progress)
    with _transformers_quiet(progress), steps:
        config = _write_config(gguf, out)
        steps.update()
        _write_tokenizer(gguf, out)
        steps.update()
        state = _dequantize(gguf, config)
        steps.update()
        _write_safetensors(state, out / "model.safetensors")
        steps.update()
        (out / "hotlora.json").write_text(json.dumps(
            {"name": gguf.stem, "source": str(gguf), "key": gguf_key(gguf),
             "converter_version": CONVERTER_VERSION, "dtype": "float32"}, indent=2))


def _write_config(gguf: Path, out: Path) -> ModelConfig:
    from transformers import AutoConfig, GenerationConfig

    cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    raw = cfg.to_dict()
    config = ModelConfig.from_hf_config(raw, gguf.stem)  # refuse unsupported models before the slow part
    cfg.architectures = [_ARCH_OF_TYPE[config.architecture]]
    cfg.dtype = torch.float32  # GGUF blocks dequantize exactly into float32
    cfg.save_pretrained(out)
    GenerationConfig.from_model_config(cfg).save_pretrained(out)
    return config


def _write_tokenizer(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tok.save_pretrained(out)
    # transformers 5 writes the template to chat_template.jinja; also keep it in tokenizer_config.json
    # for readers that only look there (transformers 4, tokenizers-only code).
    cfg_file = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    if tok.chat_template and "chat_template" not in tok_cfg:
        tok_cfg["chat_template"] = tok.chat_template
        cfg_file.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))


def _dequantize(gguf: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    state = dict(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares storage with embed_tokens; safetensors refuses aliases
    return state


def _write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({n: t.detach().contiguous() for n, t in state.items()}, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates it 0600; the cache may be shared
