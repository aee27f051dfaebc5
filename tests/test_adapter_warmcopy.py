"""The copy-path warm-up's building blocks on CPU pools (on CPU the engine skips it; `allow_cpu` runs it here): the
synthetic adapter is a PEFT file laid out as peft lays out a real one, it stages through the real staging path,
its load writes zeros into a slot's rows of every pool, and afterwards no slot is held and no statistic moved."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lora_factory import TINY, TINY_SHAPES, save_adapter, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from hotlora.adapters import warmcopy
from hotlora.adapters.cache import LoraSlotCache
from hotlora.adapters.peft_format import TARGET_MODULES, load_peft_adapter
from hotlora.adapters.registry import AdapterRegistry

RANK = 8


def _registry(layers: int, dtype: torch.dtype, slots: int = 2) -> AdapterRegistry:
    cache = LoraSlotCache(TINY_SHAPES, layers, slots, slots * RANK, torch.device("cpu"), dtype)
    return AdapterRegistry(cache, TINY_SHAPES, layers, RANK, 1 << 30)


def _layout(staged) -> dict:
    """The stacks without where the data starts (the header's length): what decides which kernels a copy runs."""
    return {m: tuple(dataclasses.replace(s, offset=0) for s in pair) for m, pair in staged.stacks.items()}


def test_zero_adapter_is_laid_out_as_peft_saves_one(tmp_path: Path):
    """12 layers: safetensors puts layer 10 before layer 2, so the pool writes take the index_copy_ path."""
    layers = 12
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**(TINY | {"num_hidden_layers": layers})))
    real = save_adapter(base, tmp_path / "real", r=RANK, target_modules=list(TARGET_MODULES))
    zero = warmcopy.write_zero_adapter(tmp_path / "zero", TINY_SHAPES, layers, RANK, torch.float32)
    cache = _registry(layers, torch.float32).cache
    staged_real = warmcopy.stage(real, cache, TINY_SHAPES, layers, RANK)
    staged_zero = warmcopy.stage(zero, cache, TINY_SHAPES, layers, RANK)
    assert set(staged_zero.stacks) == set(TARGET_MODULES)
    assert _layout(staged_zero) == _layout(staged_real)
    assert staged_zero.spans.keys() == staged_real.spans.keys() and staged_zero.check_finite
    assert staged_zero.raw.numel() == (zero / "adapter_model.safetensors").stat().st_size
    ref = load_peft_adapter(zero, "zero")  # the reference reader agrees: all zeros, scale 0
    assert ref.config.scale == 0.0 and len(ref.weights) == layers * len(TARGET_MODULES)
    assert all(not a.any() and not b.any() for a, b in ref.weights.values())


def _snapshot(registry: AdapterRegistry) -> dict:
    cache = registry.cache
    return {
        "phases": {p: list(s) for p, s in cache.stats.phases.items()},
        "transitions": {t: (h.count, h.total) for t, h in cache.stats.transitions.items()},
        "tables": [t.clone() for t in (cache.row_start, cache.scale, *cache.ranks.values())],
        "slots": list(cache.slots), "index": dict(cache.index), "rows": list(cache.rows.free),
        "slot_rank": list(cache.slot_rank), "clock": cache.clock, "evictions": dict(cache.evictions),
        "names": registry.names(), "info": registry.info(), "stats": dict(registry.stats),
    }


@pytest.mark.parametrize("layers", [2, 12])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_warm_up_writes_zeros_and_leaves_no_trace(layers, pool_dtype):
    registry = _registry(layers, pool_dtype)
    cache = registry.cache
    for a, b in cache.pools.values():  # ones, so that the zeros written show
        a.fill_(1)
        b.fill_(1)
    loads: list[object] = []
    cache.copy_hook = loads.append
    before = _snapshot(registry)
    assert registry.warm_copy() is None  # CPU pools: the engine's call does nothing
    seconds = registry.warm_copy(allow_cpu=True)
    assert seconds is not None and seconds > 0
    assert len(loads) == len(warmcopy.plan(pool_dtype, RANK)) == (1 if pool_dtype == torch.float32 else 2)
    for a, b in cache.pools.values():  # rows [0, RANK) of every layer hold exactly zero, the others are untouched
        for pool in (a, b):
            assert torch.equal(pool[:, :RANK], torch.zeros_like(pool[:, :RANK]))
            assert torch.equal(pool[:, RANK:], torch.ones_like(pool[:, RANK:]))
    after = _snapshot(registry)
    tables = after.pop("tables")
    assert all(torch.equal(x, y) for x, y in zip(tables, before.pop("tables"), strict=True))
    assert after == before
    assert all(s is None for s in cache.slots) and cache.num_ready() == 0


def test_a_real_load_after_the_warm_up_is_counted_once(tmp_path: Path):
    registry = _registry(2, torch.bfloat16)
    registry.warm_copy(allow_cpu=True)
    registry.register("a", save_adapter(tiny_llama(), tmp_path / "a", r=4, target_modules=list(TARGET_MODULES)))
    v = registry.resolve("a")
    deadline = time.monotonic() + 30
    while (slot := registry.acquire(v)) is None:
        assert time.monotonic() < deadline, "the load did not finish"
        time.sleep(0.005)
    stats = registry.cache.stats
    assert registry.stats["a"].loads == 1 and registry.cache.row_start[slot] == 0
    assert {t: h.count for t, h in stats.transitions.items()} == {"disk_to_cpu": 1, "cpu_to_gpu": 1}
    assert {p: len(s) for p, s in stats.phases.items()} == {"disk_read": 1, "parse": 1, "h2d_issue": 0,
                                                            "h2d_copy": 1, "slot_tables": 1}
    registry.close()


def test_no_temp_dir_skips_the_warm_up(monkeypatch, tmp_path: Path):
    """A read-only or missing temp dir must not stop a server from starting: the warm-up is skipped."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    registry = _registry(2, torch.float32)
    assert registry.warm_copy(allow_cpu=True) is None
    assert all(s is None for s in registry.cache.slots) and not any(registry.cache.stats.phases.values())


def test_the_switch(monkeypatch):
    monkeypatch.delenv(warmcopy.ENV, raising=False)
    assert warmcopy.enabled()
    monkeypatch.setenv(warmcopy.ENV, "0")
    assert not warmcopy.enabled()
    monkeypatch.setenv(warmcopy.ENV, "1")
    assert warmcopy.enabled()



def test_the_switch_stops_the_warm_up_itself(monkeypatch):
    """HOTLORA_WARM_ADAPTER_COPY=0 is read by the warm-up itself: the registry's call does nothing then."""
    monkeypatch.setenv(warmcopy.ENV, "0")
    registry = _registry(2, torch.float32)
    assert registry.warm_copy(allow_cpu=True) is None
