"""Adapter residency in the engine: LRU eviction, never evicting a running adapter, pinning, hot swap, load failure."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from engine_reference import default_engine

from hotlora.adapters.peft_format import AdapterError
from hotlora.adapters.rowalloc import RowAllocator
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import FinishReason, Request, SamplingParams

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(hotlora_cache, adapters) -> LLMEngine:
    # two device slots for four adapters; rows for two rank-16 adapters
    return default_engine(hotlora_cache, adapters, max_loras=2)


@pytest.fixture(scope="module")
def prompt(engine) -> list[int]:
    return engine.tokenizer.encode("The three primary colours are")


def _solo(engine: LLMEngine, prompt: list[int], adapter: str | None, rid: str) -> list[int]:
    (out,) = engine.generate([Request(rid, prompt, PARAMS, adapter)])
    assert out.error is None
    return out.new_token_ids


def _residency(engine: LLMEngine) -> dict[str, str]:
    return {a.name: a.residency for a in engine.registry.info()}


def test_lru_eviction_keeps_outputs(engine, prompt):
    first = {name: _solo(engine, prompt, name, f"lru-{name}") for name in ("qv8", "all16", "mlp4rs")}
    res = _residency(engine)
    assert res["qv8"] != "device" and res["all16"] == "device" and res["mlp4rs"] == "device"  # qv8 was LRU
    info = {a.name: a for a in engine.registry.info()}
    assert info["qv8"].evictions >= 1 and info["qv8"].loads >= 1
    again = _solo(engine, prompt, "qv8", "lru-qv8-again")  # reloaded into a slot: same weights, same tokens
    assert again == first["qv8"]
    assert {name: _solo(engine, prompt, name, f"hit-{name}") for name in ("mlp4rs",)}["mlp4rs"] == first["mlp4rs"]
    assert info["qv8"].sha256 and len(info["qv8"].sha256) == 64


def test_running_adapters_are_never_evicted(engine, prompt):
    alone = {name: _solo(engine, prompt, name, f"alone-{name}") for name in ("qv8", "all16", "ku12")}
    # three adapters, two slots: the third waits for a slot instead of evicting a running one
    long = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reqs = [Request(f"busy-{n}", prompt, long, n) for n in ("qv8", "all16", "ku12")]
    for r in reqs:
        engine.add_request(r)
    tokens: dict[str, list[int]] = {}
    for out in engine.step():
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    stats = engine.stats()
    assert stats.num_running == 2 and len(stats.waiting_adapters) == 1
    assert {*stats.running_adapters, *stats.waiting_adapters} == set(alone)
    while engine.has_unfinished():
        running = engine.stats().running_adapters
        assert all(_residency(engine)[n] == "device" for n in running)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert {n: tokens[f"busy-{n}"] for n in alone} == alone
    assert engine.blocks.num_used == 0


def test_pinned_adapter_stays_resident(engine, prompt):
    engine.registry.pin("mlp4rs")
    try:
        for name in ("qv8", "all16", "ku12", "qv8"):
            _solo(engine, prompt, name, f"pin-{name}-{len(engine.registry.info())}")
            assert _residency(engine)["mlp4rs"] == "device"
        assert engine.registry.info()[[a.name for a in engine.registry.info()].index("mlp4rs")].pinned
    finally:
        engine.registry.unpin("mlp4rs")


def test_pinning_never_takes_the_last_unpinned_slot(engine, prompt):
    """With every device slot pinned no other adapter (nor any mix) could ever be admitted: its requests would
    wait forever. The pin that would take the last unpinned slot is refused, and other adapters keep running."""
    engine.registry.pin("mlp4rs")
    try:
        with pytest.raises(AdapterError, match="every device slot"):
            engine.registry.pin("qv8")
        assert not {a.name: a for a in engine.registry.info()}["qv8"].pinned
        assert _solo(engine, prompt, "ku12", "after-a-refused-pin")
        engine.registry.pin("mlp4rs")  # pinning a pinned adapter again takes no slot: still fine
    finally:
        engine.registry.unpin("mlp4rs")
        engine.registry.unpin("qv8")


def test_pinning_leaves_rows_for_the_largest_rank(hotlora_cache, adapters, prompt):
    """Pinned adapters hold their rows: a pin that would leave fewer than max_lora_rank unpinned rows is refused
    although a slot is free, so a rank-16 adapter can still be loaded."""
    engine = default_engine(hotlora_cache, adapters, max_loras=3, lora_pool_rows=24)
    engine.registry.pin("qv8")  # 8 rows: 16 left
    with pytest.raises(AdapterError, match="unpinned pool rows"):
        engine.registry.pin("mlp4rs")  # 4 more rows would leave 12
    assert not {a.name: a for a in engine.registry.info()}["mlp4rs"].pinned
    assert _solo(engine, prompt, "all16", "rank-16-after-a-refused-pin")
    engine.registry.unpin("qv8")
    engine.registry.pin("qv8")  # 16 rows left, as at first
    assert {a.name: a for a in engine.registry.info()}["qv8"].pinned


def test_a_pin_never_splits_the_unpinned_rows(hotlora_cache, adapters, prompt):
    """Pinned adapters sit at the top of the pool. One loaded first fit in the middle (rows 8-11, above an idle
    rank-8 adapter) and pinned there would leave runs of 8 and 12 unpinned rows of 24: a rank-16 adapter could
    never load although 20 rows are unpinned. The pin copies it to rows 20-23 first, once no request uses it."""
    engine = default_engine(hotlora_cache, adapters, max_loras=4, lora_pool_rows=24)
    registry, cache = engine.registry, engine.registry.cache
    _solo(engine, prompt, "qv8", "first-fit-low")  # rows 0-7
    before = _solo(engine, prompt, "mlp4rs", "first-fit-middle")  # rows 8-11
    assert cache.slots[cache.lookup(registry.resolve("mlp4rs"))].row_start == 8
    engine.add_request(Request("busy", prompt, PARAMS, "mlp4rs"))
    engine.step()  # admitted: the adapter is in use, so it cannot move yet
    with pytest.raises(AdapterError, match="retry when it is idle"):
        registry.pin("mlp4rs")
    while engine.has_unfinished():
        engine.step()
    registry.pin("mlp4rs")
    slot = cache.lookup(registry.resolve("mlp4rs"))
    assert cache.slots[slot].row_start == 20 and cache.slots[slot].pinned
    assert cache.largest_unpinned_run() == 20
    assert _solo(engine, prompt, "all16", "rank-16-beside-a-pin")  # evicts qv8: rows 0-15
    assert _solo(engine, prompt, "mlp4rs", "moved") == before  # the copy at the top holds the same weights
    registry.unpin("mlp4rs")


def test_row_allocator_from_the_top():
    rows = RowAllocator(24)
    assert rows.alloc(8) == 0 and rows.alloc(4, high=True) == 20 and rows.alloc(4) == 8
    assert rows.free == [(12, 8)]
    rows.release(0, 8)
    assert rows.alloc(6, high=True) == 14 and rows.alloc(8) == 0 and rows.free == [(12, 2)]
    assert rows.alloc(3) is None and rows.alloc(3, high=True) is None


def test_hot_swap_running_sequence_finishes_on_old_weights(engine, prompt, peft_dirs):
    # peft_dirs (B ~ N(0, 0.5)) change the output far more than `adapters`: two clearly different versions
    engine.registry.register("swap", peft_dirs["a"])
    old_tokens = _solo(engine, prompt, "swap", "swap-old")
    engine.registry.register("swap", peft_dirs["x"])
    new_tokens = _solo(engine, prompt, "swap", "swap-new-ref")
    assert old_tokens != new_tokens
    engine.registry.register("swap", peft_dirs["a"])
    engine.add_request(Request("inflight", prompt, PARAMS, "swap"))
    tokens: dict[str, list[int]] = {}
    for out in engine.step():  # admitted on version "a"
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    engine.registry.register("swap", peft_dirs["x"])  # hot swap under the same name
    engine.add_request(Request("after", prompt, PARAMS, "swap"))
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert tokens["inflight"] == old_tokens and tokens["after"] == new_tokens
    # replaced versions are gone from the device cache, its slots and its counters (no host copy kept alive)
    current = set(engine.registry.current.values())
    assert set(engine.registry.cache.evictions) <= current and set(engine.registry.cache.index) <= current
    engine.registry.remove("swap")


def test_adapter_that_fails_to_load_fails_only_its_request(engine, prompt, adapters, tmp_path: Path):
    broken = shutil.copytree(adapters["mlp4rs"], tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    engine.registry.register("broken", broken)
    outs = engine.generate([Request("bad", prompt, PARAMS, "broken"), Request("good", prompt, PARAMS, None)])
    assert outs[0].finished and outs[0].error and "broken" in outs[0].error
    assert outs[0].finish_reason is FinishReason.ABORT
    assert outs[1].error is None and len(outs[1].new_token_ids) == PARAMS.max_tokens
    engine.registry.remove("broken")
    assert engine.blocks.num_used == 0 and not engine.has_unfinished()


def test_cold_adapter_load_does_not_stall_other_requests(engine, prompt, adapters, monkeypatch, tmp_path: Path):
    expected = _solo(engine, prompt, "ku12", "cold-ref")
    cold = shutil.copytree(adapters["ku12"], tmp_path / "cold")
    engine.registry.register("cold", cold)  # registered, never loaded
    gate = threading.Event()
    real_read = engine.registry._read

    def slow_read(v):  # the real disk read, held back until the test has seen the others decode
        gate.wait(30)
        return real_read(v)

    monkeypatch.setattr(engine.registry, "_read", slow_read)
    long = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine.add_request(Request("warm", prompt, long, None))
    engine.add_request(Request("coldreq", prompt, PARAMS, "cold"))
    tokens: dict[str, list[int]] = {}
    for _ in range(6):  # the base request decodes while the adapter is still on its way from disk
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert len(tokens["warm"]) == 6 and "coldreq" not in tokens
    assert engine.stats().waiting_adapters == ["cold"]
    gate.set()
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert tokens["coldreq"] == expected and len(tokens["warm"]) == 12
    engine.registry.remove("cold")


def test_host_budget_below_one_adapter_still_serves(engine, prompt):
    """With a host budget smaller than any adapter, every load still reaches the device (the copy being
    loaded is never the one trimmed), and at most that one copy stays in host memory."""
    alone = {name: _solo(engine, prompt, name, f"budget-ref-{name}") for name in ("qv8", "all16", "ku12", "mlp4rs")}
    budget = engine.registry.host_budget
    engine.registry.host_budget = 1
    try:
        for v in engine.registry.current.values():
            engine.registry.cache.evict(v)  # cold start: every adapter comes from disk again
            v.host = None
        for r in (Request(f"budget-{n}", prompt, PARAMS, n) for n in alone):
            engine.add_request(r)
        tokens: dict[str, list[int]] = {}
        for _ in range(500):  # a load that keeps starting over never finishes
            if not engine.has_unfinished():
                break
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert sum(v.host is not None for v in engine.registry.current.values()) <= 1
        assert {n: tokens.get(f"budget-{n}") for n in alone} == alone
    finally:
        engine.registry.host_budget = budget


def test_prefetch_makes_room_by_dropping_host_copies_of_resident_adapters(engine, prompt):
    """A full host budget held by copies of adapters already on the device does not stop a queued request's
    disk read: the least recently used resident copy is dropped for it (the device copy stays usable)."""
    reg = engine.registry
    ref = _solo(engine, prompt, "ku12", "room-ref-ku12")
    for name in ("qv8", "mlp4rs"):
        _solo(engine, prompt, name, f"room-{name}")
    qv8, mlp4rs, ku12 = (reg.current[n] for n in ("qv8", "mlp4rs", "ku12"))
    assert reg.is_ready(qv8) and reg.is_ready(mlp4rs) and qv8.host is not None and mlp4rs.host is not None
    for v in reg.current.values():  # only the two resident copies are in host memory
        if v is not qv8 and v is not mlp4rs:
            v.host = None
    budget = reg.host_budget
    try:
        reg.host_budget = mlp4rs.host.nbytes + ku12.file_bytes  # ku12 fits once one resident copy is dropped
        reg.cache.evict(ku12)
        ku12.host = None
        engine.add_request(Request("room-ku12", prompt, PARAMS, "ku12"))
        assert ku12.loading is not None or ku12.host is not None  # the read started at queueing time
        assert qv8.host is None and mlp4rs.host is not None  # qv8 was used least recently
        assert reg.is_ready(qv8)  # its device copy is untouched
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens.extend(out.new_token_ids)
        assert tokens == ref
    finally:
        reg.host_budget = budget
