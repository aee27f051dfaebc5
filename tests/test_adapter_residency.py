"""Cold adapter loads off the step loop (fault injection), bounded waits with more adapters than slots, unload."""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from pathlib import Path

import pytest
from engine_reference import default_engine
from lora_factory import preset_llama, save_adapters_by_spec

from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams

SHORT = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
STALL_S = 1.5  # each injected stage (disk read, device copy) sleeps this long


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Adapters saved by peft on the random:tiny architecture (steps take milliseconds on a CPU)."""
    specs = {
        "qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "all16": dict(r=16, lora_alpha=16, target_modules="all-linear"),
        "ku12": dict(r=12, lora_alpha=24, target_modules=["k_proj", "up_proj"]),
        "mlp4rs": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
    }
    return save_adapters_by_spec(preset_llama("tiny"), tmp_path_factory.mktemp("tiny-adapters"), specs)


@pytest.fixture(scope="module")
def engine(hotlora_cache, adapters) -> LLMEngine:
    return default_engine(hotlora_cache, adapters, model="random:tiny", max_loras=2)


@pytest.fixture(scope="module")
def prompt(engine) -> list[int]:
    return engine.tokenizer.encode("Name three rivers")


def _cold_start(engine: LLMEngine) -> None:
    for v in engine.registry.current.values():
        engine.registry.cache.evict(v)
        v.host = None


def test_slow_disk_and_copy_do_not_stall_other_sequences(engine, prompt, adapters, tmp_path: Path):
    """A cold load whose disk read and device copy each take STALL_S: the base request keeps decoding
    at its usual pace meanwhile (token timestamps), and the stages ran off the engine thread."""
    engine.registry.register("slow", shutil.copytree(adapters["ku12"], tmp_path / "slow"))
    stages: dict[str, str] = {}

    def slow(stage: str):
        def hook(key) -> None:
            if getattr(key, "name", key) == "slow":
                stages[stage] = threading.current_thread().name
                time.sleep(STALL_S)
        return hook

    engine.registry.read_hook, engine.registry.cache.copy_hook = slow("read"), slow("copy")
    try:
        engine.add_request(Request("warm", prompt, SamplingParams(max_tokens=2000, temperature=0.0,
                                                                  ignore_eos=True), None))
        stamps: dict[str, list[float]] = {"warm": [], "cold": []}
        deadline = time.monotonic() + 120
        while not stamps["warm"]:  # the warm request is decoding before the cold one arrives
            for out in engine.step():
                stamps[out.request_id].append(time.perf_counter())
        t_cold = time.perf_counter()
        engine.add_request(Request("cold", prompt, SHORT, "slow"))
        while len(stamps["cold"]) < SHORT.max_tokens and time.monotonic() < deadline:
            for out in engine.step():
                stamps[out.request_id].append(time.perf_counter())
        engine.abort("warm")
    finally:
        engine.registry.read_hook = engine.registry.cache.copy_hook = None
    assert len(stamps["cold"]) == SHORT.max_tokens
    window = [t for t in stamps["warm"] if t_cold <= t <= stamps["cold"][0]]
    assert stamps["cold"][0] - t_cold >= 2 * STALL_S  # both injected stages were waited for...
    gaps = [b - a for a, b in itertools.pairwise(window)]
    assert len(window) >= 10 and max(gaps) < STALL_S / 2, (len(window), max(gaps))  # ...by "cold" alone
    assert stages["read"].startswith("adapter-load") and stages["copy"].startswith("adapter-h2d")
    assert not engine.has_unfinished()
    engine.registry.remove("slow")


def _drive(engine: LLMEngine, prompt: list[int], wait_steps: int, cap: int) -> tuple[int | None, int]:
    """Two popular adapters keep both device slots busy; one request for a third arrives at step 3.
    Returns (steps from its arrival to its last token or None if it did not finish in `cap` steps,
    blocked-steps counter increase)."""
    engine.scheduler.max_adapter_wait_steps = wait_steps
    blocked0 = engine.scheduler.num_adapter_blocked_steps
    live: set[str] = set()
    n, arrived, done = 0, None, None
    for step in range(cap):
        while len(live) < 4:  # the popular traffic never pauses
            rid = f"pop-{wait_steps}-{n}"
            engine.add_request(Request(rid, prompt, SHORT, ("qv8", "all16")[n % 2]))
            live.add(rid)
            n += 1
        if step == 3:
            engine.add_request(Request(f"rare-{wait_steps}", prompt, SHORT, "ku12"))
            arrived = step
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
                if out.request_id.startswith("rare"):
                    assert out.error is None and out.completion_tokens == SHORT.max_tokens
                    done = step
        if done is not None:
            break
    for rid in [*live, f"rare-{wait_steps}"]:
        engine.abort(rid)
    return (None if done is None else done - arrived), engine.scheduler.num_adapter_blocked_steps - blocked0


def test_more_adapters_than_slots_every_request_within_bound(engine, prompt):
    """Bound: an overdue request (max_adapter_wait_steps W) bars other adapters from being admitted, so
    the running sequences drain within one request's length (max_tokens + 1 steps, the prompt fitting
    one step), then its adapter loads (the read was prefetched when it was queued; allow 25 steps for
    the copy to be published) and it runs its own max_tokens + 1 steps."""
    _cold_start(engine)
    for name in ("qv8", "all16", "ku12"):
        engine.registry.pin(name)  # warm host copies, so that the bound does not hinge on disk speed
        engine.registry.unload(name)
    wait = 8
    bound = wait + 2 * (SHORT.max_tokens + 1) + 25
    took, _ = _drive(engine, prompt, wait, cap=bound + 1)
    assert took is not None and took <= bound, took
    # without the bound (a wait longer than the run) the same traffic starves it, and the steps it
    # spent waiting with room in the batch are counted
    for v in engine.registry.current.values():  # the same start as the first run: host copies only
        engine.registry.cache.evict(v)
    starved, blocked = _drive(engine, prompt, 10**6, cap=bound + 1)
    assert starved is None and blocked > 0
    assert engine.stats().num_adapter_blocked_steps >= blocked


def test_unload_frees_the_slot_when_idle_or_after_its_last_user(engine, prompt):
    engine.generate([Request("u1", prompt, SHORT, "mlp4rs")])
    info = {a.name: a for a in engine.registry.info()}
    assert info["mlp4rs"].residency == "device"
    assert engine.registry.unload("mlp4rs") is True
    assert {a.name: a.residency for a in engine.registry.info()}["mlp4rs"] == "host"  # slot free at once
    engine.add_request(Request("u2", prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                               "mlp4rs"))
    while not engine.scheduler.running:
        engine.step()
    assert engine.registry.unload("mlp4rs") is False  # a running sequence uses it: it keeps the slot...
    assert {a.name: a.residency for a in engine.registry.info()}["mlp4rs"] == "device"
    while engine.has_unfinished():
        engine.step()
    assert {a.name: a.residency for a in engine.registry.info()}["mlp4rs"] == "host"  # ...until it ends


@pytest.mark.parametrize("value", ["nan", "1e300"])  # 1e300: finite as the file's float64, inf in the pools
def test_non_finite_weights_fail_on_the_device_check_only_their_request(engine, prompt, adapters, tmp_path: Path,
                                                                        value):
    """A cold load checks finiteness after the copy (not on the host): a NaN fails that adapter's
    requests with a message saying so, and the slot is free again."""
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(adapters["qv8"], tmp_path / "nan")
    tensors = load_file(bad / "adapter_model.safetensors")
    if value != "nan":
        tensors = {k: t.double() for k, t in tensors.items()}
    key = sorted(tensors)[3]
    tensors[key][0, 0] = float(value)
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    engine.registry.register("nan", bad)
    outs = engine.generate([Request("nan1", prompt, SHORT, "nan"), Request("ok1", prompt, SHORT, None)])
    assert outs[0].error and "NaN or infinite" in outs[0].error
    assert outs[1].error is None and len(outs[1].new_token_ids) == SHORT.max_tokens
    (again,) = engine.generate([Request("nan2", prompt, SHORT, "nan")])  # fails fast, no second load
    assert again.error and "NaN" in again.error
    assert engine.registry.cache.lookup(engine.registry.resolve("nan")) is None
    engine.registry.remove("nan")


def test_engine_thread_issues_copies_after_the_launch_or_at_once_when_nothing_runs(engine, prompt, monkeypatch):
    """The CUDA issue path's scheduling, on CPU pools (copy_thread off): a copy reserved while another request
    decodes is issued on the stepping thread right after that step's forward (its launch, on CUDA); with
    nothing to run, in the same step; a copy reserved outside a step, by engine.idle(). The adapter's tokens
    equal those of a load through the copy thread."""
    cache = engine.registry.cache
    _cold_start(engine)
    (want,) = engine.generate([Request("ref", prompt, SHORT, "ku12")])
    events: list = []
    forward = engine.runner.model.forward

    def traced_forward(*args, **kwargs):
        events.append("forward")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.runner.model, "forward", traced_forward)
    monkeypatch.setattr(cache, "copy_hook", lambda key: events.append(("copy", key.name, threading.current_thread())))
    monkeypatch.setattr(cache, "copy_thread", False)
    copy = ("copy", "ku12", threading.current_thread())

    _cold_start(engine)
    engine.add_request(Request("warm", prompt, SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True),
                               None))
    while not engine.scheduler.running:
        engine.step()
    engine.add_request(Request("cold", prompt, SHORT, "ku12"))
    got: list[int] = []
    for _ in range(200):
        got += [t for out in engine.step() if out.request_id == "cold" for t in out.new_token_ids]
        if len(got) == SHORT.max_tokens:
            break
    engine.abort("warm")
    assert got == want.new_token_ids
    assert events.count(copy) == 1 and events[events.index(copy) - 1] == "forward"

    _cold_start(engine)
    events.clear()
    (alone,) = engine.generate([Request("alone", prompt, SHORT, "ku12")])
    assert alone.new_token_ids == want.new_token_ids and events[0] == copy  # before any forward: none ran

    v = engine.registry.resolve("qv8")
    engine.registry.pin("qv8")  # a host copy, then free the slot again
    engine.registry.unload("qv8")
    assert engine.registry.acquire(v) is None  # reserved outside a step: queued
    engine.idle()
    engine.registry.poll()
    assert engine.registry.is_ready(v) and ("copy", "qv8", threading.current_thread()) in events
    assert not engine.has_unfinished()
