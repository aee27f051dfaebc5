"""The cold-load path on CUDA: pinned read, one transfer on the side stream, cast/transpose into the pools,
finiteness checked on the device, slot tables written only once the copy's event has completed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from lora_factory import TINY_SHAPES, save_adapter, tiny_llama

from hotlora.adapters.cache import LoraSlotCache
from hotlora.adapters.peft_format import AdapterError, load_peft_adapter
from hotlora.adapters.registry import AdapterRegistry

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
LAYERS = 2


def _registry(slots: int = 2) -> AdapterRegistry:
    cache = LoraSlotCache(TINY_SHAPES, LAYERS, slots, slots * 16, torch.device("cuda"), torch.bfloat16)
    return AdapterRegistry(cache, TINY_SHAPES, LAYERS, 16, 1 << 30)


def _acquire(registry: AdapterRegistry, name: str) -> int:
    """Poll as admission does (never blocking) until the slot is usable."""
    v = registry.resolve(name)
    deadline = time.monotonic() + 30
    while (slot := registry.acquire(v)) is None:
        assert time.monotonic() < deadline, "the load did not finish"
        registry.poll()
        time.sleep(0.001)
    return slot


def test_cold_load_lands_in_the_pools_exactly(tmp_path: Path):
    folder = save_adapter(tiny_llama(), tmp_path / "a", r=8, lora_alpha=16, target_modules="all-linear")
    registry = _registry()
    registry.register("a", folder)
    slot = _acquire(registry, "a")
    cache = registry.cache
    assert registry.resolve("a").host.raw.is_pinned()
    ref = load_peft_adapter(folder, "a")
    start = int(cache.row_start[slot])
    for (layer, module), (a, b) in ref.weights.items():
        pool = cache.layers[layer][module]
        torch.testing.assert_close(pool.a[start : start + 8].float().cpu(), a.to(torch.bfloat16).float())
        torch.testing.assert_close(pool.b[start : start + 8].float().cpu(), b.T.to(torch.bfloat16).float())
        assert int(cache.ranks[module][slot]) == 8
    assert float(cache.scale[slot]) == pytest.approx(ref.config.scale)
    phases = cache.stats.summary()
    assert {"disk_read", "parse", "h2d_issue", "h2d_copy", "slot_tables"} <= phases.keys()
    registry.close()


def test_non_finite_weights_are_caught_on_the_device(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    folder = save_adapter(tiny_llama(), tmp_path / "nan", r=4)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    registry = _registry()
    registry.register("nan", folder)
    with pytest.raises(AdapterError, match="NaN or infinite"):
        _acquire(registry, "nan")
    assert registry.cache.lookup(registry.resolve("nan")) is None
    registry.close()


def test_warmed_staging_blocks_serve_the_first_loads(tmp_path: Path):
    """After warm_staging, cold loads take their pinned buffers from torch's cache: no new pinned allocation
    (cudaHostAlloc stalls the engine thread's launches while it pins pages)."""
    model = tiny_llama()
    registry = _registry(slots=3)
    for i, r in enumerate((4, 8, 16)):
        registry.register(f"a{i}", save_adapter(model, tmp_path / f"a{i}", r=r, lora_alpha=16, seed=i,
                                                target_modules="all-linear"))
    assert registry.warm_staging() >= sum(v.file_bytes for v in registry.current.values())
    before = torch.cuda.host_memory_stats()["num_host_alloc"]
    for i in range(3):
        _acquire(registry, f"a{i}")
    assert torch.cuda.host_memory_stats()["num_host_alloc"] == before
