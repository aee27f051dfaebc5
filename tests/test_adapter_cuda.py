"""The cold-load path on CUDA: pinned read, one transfer on the side stream, cast/transpose into the pools,
finiteness checked on the device, slot tables written only once the copy's event has completed; and cold loads
issued by the engine thread (or the copy thread) while the engine decodes, against PEFT."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch
from engine_reference import (
    ADAPTER_SPECS,
    BF16_LOGPROB,
    BF16_TIE,
    Reference,
    default_engine,
    drain_outputs,
    teacher_forced_gaps,
)
from lora_factory import TINY_SHAPES, save_adapter, tiny_llama

from hotlora.adapters import warmcopy
from hotlora.adapters.cache import LoraSlotCache
from hotlora.adapters.peft_format import AdapterError, load_peft_adapter
from hotlora.adapters.registry import AdapterRegistry
from hotlora.server.engine.types import Request, RequestOutput, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
LAYERS = 2


def _registry(slots: int = 2) -> AdapterRegistry:
    cache = LoraSlotCache(TINY_SHAPES, LAYERS, slots, slots * 16, torch.device("cuda"), torch.bfloat16)
    return AdapterRegistry(cache, TINY_SHAPES, LAYERS, 16, 1 << 30)


def _acquire(registry: AdapterRegistry, name: str) -> int:
    """Poll as admission does (never blocking) until the slot is usable; the copy is issued where the engine
    would issue it, between two polls."""
    v = registry.resolve(name)
    deadline = time.monotonic() + 30
    while (slot := registry.acquire(v)) is None:
        assert time.monotonic() < deadline, "the load did not finish"
        registry.cache.issue_pending()
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


@pytest.mark.parametrize("switch", ["1", "0"], ids=["warm", "off"])
def test_engine_start_warms_the_copy_path_without_a_trace(switch, monkeypatch, gpu_model_dir, gpu_adapters,
                                                           hotlora_cache):
    """The engine's start-up runs one synthetic load through the copy path (HOTLORA_WARM_ADAPTER_COPY=0: none) and
    leaves no slot held and no statistic moved; the first real load then counts as the first."""
    monkeypatch.setenv(warmcopy.ENV, switch)
    engine = default_engine(hotlora_cache, {"all16": gpu_adapters["all16"]}, model=str(gpu_model_dir),
                            device="cuda", dtype="bfloat16", kv_cache_memory=0.05, cuda_graphs=False)
    registry, cache = engine.registry, engine.registry.cache
    assert (engine.copy_warm_seconds is not None) == (switch == "1")
    assert all(s is None for s in cache.slots) and not cache.index and cache.rows.free == [(0, cache.pool_rows)]
    assert all(not t.any() for t in (cache.row_start, cache.scale, *cache.ranks.values()))
    assert all(not a.any() and not b.any() for a, b in cache.pools.values())
    assert not any(cache.stats.phases.values()) and not cache.evictions
    assert {t: h.count for t, h in engine.stats().adapter_load_seconds.items()} == {"disk_to_cpu": 0, "cpu_to_gpu": 0}
    assert [(i.name, i.residency, i.loads, i.evictions) for i in registry.info()] == [("all16", "disk", 0, 0)]
    _acquire(registry, "all16")
    assert registry.stats["all16"].loads == 1 and cache.num_ready() == 1
    assert {t: h.count for t, h in cache.stats.transitions.items()} == {"disk_to_cpu": 1, "cpu_to_gpu": 1}
    assert len(cache.stats.phases["h2d_copy"]) == 1
    registry.close()


N_TOKENS = 24


@pytest.fixture(scope="module")
def nf4_reference(gpu_model_dir, gpu_adapters) -> Reference:
    return Reference(gpu_model_dir, gpu_adapters, "nf4", device="cuda", dtype=torch.bfloat16)


def _decode_with_cold_arrivals(engine, work: list[tuple[list[int], str | None]]) -> list[RequestOutput]:
    """The base requests of `work` start at step 0; each adapter request arrives 3 steps after the previous
    one, while the base requests decode, its adapter cold. Each request's tokens and logprobs, accumulated."""
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
    arrivals: dict[int, list[Request]] = {}
    for i, (ids, adapter) in enumerate(work):
        at = 0 if adapter is None else 3 * (1 + sum(a is not None for _, a in work[:i]))
        arrivals.setdefault(at, []).append(Request(f"w{i}", ids, params, adapter))
    got = drain_outputs(engine, arrivals)
    return [RequestOutput(f"w{i}", "", [t for o in got[f"w{i}"] for t in o.new_token_ids],
                          logprobs=[lp for o in got[f"w{i}"] for lp in o.logprobs or []]) for i in range(len(work))]


@pytest.mark.parametrize("copy_thread", [False, True], ids=["engine-thread", "copy-thread"])
def test_cold_loads_during_decode_track_peft(copy_thread, gpu_model_dir, gpu_adapters, hotlora_cache,
                                              nf4_reference):
    """Four cold adapters arrive one after another while two base requests decode (NF4, CUDA graphs): each copy
    is issued by the engine's own thread (by default) or by the copy thread (the A/B switch), and every
    request, the decoding ones included, tracks PEFT's tokens and logprobs."""
    engine = default_engine(hotlora_cache, gpu_adapters, model=str(gpu_model_dir), quant="nf4", device="cuda",
                            dtype="bfloat16", kv_cache_memory=0.1, max_num_seqs=8)
    cache = engine.registry.cache
    assert cache.copy_thread is False  # CUDA's default
    cache.copy_thread = copy_thread
    issuers: list[str] = []
    cache.copy_hook = lambda key: issuers.append(threading.current_thread().name)
    rng = random.Random(11)
    work = [([rng.randrange(3, 49152) for _ in range(9 + 5 * i)], a)
            for i, a in enumerate([None, None, *ADAPTER_SPECS])]  # fmt: skip
    outs = _decode_with_cold_arrivals(engine, work)
    assert len(issuers) == len(ADAPTER_SPECS)
    want = "adapter-h2d" if copy_thread else threading.current_thread().name
    assert all(name.startswith(want) for name in issuers), issuers
    assert engine.runner.graphs is not None and engine.runner.graphs.failed is None
    assert engine.blocks.num_used == 0 and engine.registry.cache.num_ready() == len(ADAPTER_SPECS)
    gaps = teacher_forced_gaps(nf4_reference, work, outs, N_TOKENS)
    for (_, adapter), (gap, diff) in zip(work, gaps, strict=True):
        assert gap <= BF16_TIE, f"adapter {adapter}: a token {gap:.3f} nats below the reference's best"
        assert diff <= BF16_LOGPROB, f"adapter {adapter}: logprobs differ by {diff:.3f}"
    phases = cache.stats.summary()
    assert {"h2d_issue", "h2d_copy", "slot_tables"} <= phases.keys()
