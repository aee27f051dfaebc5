"""Warm-up of the adapter copy path at engine start: one cold load of a synthetic all-zero adapter, then its slot freed.

Why: on an H200 the first adapter load after a start stalled one decode step (~40 ms; its device copy took ~36 ms
against ~2 ms for later loads, BENCHMARKS.md, issue 12). The suspects are first-use costs on the copy path: CUDA's
lazy module loading (CUDA_MODULE_LOADING=LAZY, the default) of the kernels the pool writes run for the first time
(dtype casts, strided and transposed copies, index_copy_, the finiteness check and its reduction, the slot-table
writes), which can serialize with running work, and the caching allocator's first segment on the side stream. Paid
here, before any step runs, they cost no running sequence anything.

What runs is a real cold load's code: a PEFT-format folder (adapter_config.json + adapter_model.safetensors, all
seven projections, zeros) is written to a temp dir, read and parsed by adapters/staging.py (the raw file in one
buffer, pinned on CUDA, with its Stacks) and checked against the base as the registry's reading thread does, then
`LoraSlotCache.load` (reserve, issue_pending, poll: the side stream, the events, the slot tables) copies it in,
and the slot is evicted. It runs twice (once for float32 pools): in the pools' dtype at the largest rank the
pools take (so the side stream's cached device segment is as large as any later file of that dtype), and in
float32 (how QLoRA adapters are usually saved: a cast kernel instead of a plain copy) at an eighth of that rank.

No trace: the weights are zeros and lora_alpha is 0, so the pools and the slot tables (ranks, row start, scale) end
as they began on a fresh cache; the registry is not involved (no name, no load or eviction count), and the
cache's LoadStats is swapped for a throwaway one meanwhile (no phase sample, no load-seconds histogram entry).
What stays: the loaded kernels, the allocator's device segment on the side stream, and one pinned host block in
torch's cache (the file's size rounded up to a power of two).

HOTLORA_WARM_ADAPTER_COPY=0 turns it off (for A/B runs: bench/adapter_load.py --engine --variants nowarm,default).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from hotlora.adapters.cache import LoraSlotCache
from hotlora.adapters.loadstats import LoadStats
from hotlora.adapters.peft_config import TARGET_MODULES
from hotlora.adapters.peft_format import check_compatible, lora_weight_key, write_peft_folder
from hotlora.adapters.staging import StagedAdapter, parse_staged, read_raw

log = logging.getLogger(__name__)

ENV = "HOTLORA_WARM_ADAPTER_COPY"


def enabled() -> bool:
    """False when HOTLORA_WARM_ADAPTER_COPY=0."""
    return os.environ.get(ENV, "1").strip() != "0"


def write_zero_adapter(folder: Path, linear_shapes: dict[str, tuple[int, int]], num_layers: int, rank: int,
                       dtype: torch.dtype) -> Path:
    """A PEFT-format adapter of rank `rank` on all seven projections of every layer, zeros in `dtype`, with
    lora_alpha 0 (scale 0), written as peft saves it (safetensors sorts the names, as in any real file)."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 0, "bias": "none",
              "target_modules": list(TARGET_MODULES), "use_rslora": False}
    tensors = {}
    for layer in range(num_layers):
        for m in TARGET_MODULES:
            out_f, in_f = linear_shapes[m]
            tensors[lora_weight_key(layer, m, "A")] = torch.zeros(rank, in_f, dtype=dtype)
            tensors[lora_weight_key(layer, m, "B")] = torch.zeros(out_f, rank, dtype=dtype)
    return write_peft_folder(folder, tensors, config)


def stage(folder: Path, cache: LoraSlotCache, linear_shapes: dict[str, tuple[int, int]], num_layers: int,
          max_rank: int) -> StagedAdapter:
    """`folder` staged as the registry's reading thread stages a cold load (AdapterRegistry._read), untimed."""
    raw = read_raw(folder, pin=cache.device.type == "cuda", lock=cache.copy_lock)
    staged = parse_staged(raw, folder, "copy-path-warm-up")
    check_compatible(staged, linear_shapes, num_layers, max_rank)
    return staged


def plan(pool_dtype: torch.dtype, rank: int) -> list[tuple[torch.dtype, int]]:
    """(file dtype, rank) of each warm-up load: the pools' dtype at `rank`; float32 at an eighth of it (its cast
    kernels load at any size, and the side stream's segment is already as large as any later file's)."""
    out = [(pool_dtype, rank)]
    if pool_dtype != torch.float32:
        out.append((torch.float32, max(1, rank // 8)))
    return out


def warm_copy_path(cache: LoraSlotCache, linear_shapes: dict[str, tuple[int, int]], num_layers: int,
                   max_rank: int, allow_cpu: bool = False) -> float | None:
    """Run the copy path once per `plan` entry and leave no trace (module docstring); the seconds it took, or None
    where it does not run (HOTLORA_WARM_ADAPTER_COPY=0; CPU pools, unless `allow_cpu`: tests)."""
    if not enabled() or (cache.device.type != "cuda" and not allow_cpu):
        return None
    t0 = time.perf_counter()
    rank = min(max_rank, cache.pool_rows)
    kept, cache.stats = cache.stats, LoadStats()
    try:
        with tempfile.TemporaryDirectory(prefix="hotlora-warm-copy-") as tmp:
            for dtype, r in plan(cache.dtype, rank):
                folder = write_zero_adapter(Path(tmp) / str(dtype).removeprefix("torch."), linear_shapes,
                                            num_layers, r, dtype)
                _load_and_free(cache, stage(folder, cache, linear_shapes, num_layers, max_rank))
        if cache.device.type == "cuda":  # the slot-table writes too, so that the time logged is all of it
            torch.cuda.synchronize(cache.device)
    except OSError as exc:  # no writable temp dir: serve anyway, the first load pays as before
        log.warning("skipped the adapter copy warm-up: %s", exc)
        return None
    finally:
        cache.stats = kept
    seconds = time.perf_counter() - t0
    log.info("warmed the adapter copy path in %.0f ms (rank %d, %s files; %s=0 turns this off)", seconds * 1000,
             rank, "/".join(str(d).removeprefix("torch.") for d, _ in plan(cache.dtype, rank)), ENV)
    return seconds


def _load_and_free(cache: LoraSlotCache, staged: StagedAdapter) -> None:
    key = object()  # nobody else's key: the registry's keys are its versions
    slot = cache.load(key, staged)
    if slot is None:
        raise RuntimeError("the adapter copy warm-up found no free slot (it must run before any load)")
    if not cache.evict(key):
        raise RuntimeError("the adapter copy warm-up could not free its slot")
