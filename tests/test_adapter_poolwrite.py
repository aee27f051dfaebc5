"""The copy stage of a cold load on CPU pools: stacked writes (one strided view per module, layers in the file's
order) land exactly where the per-layer reference puts them, the number of torch calls per copy does not grow
with the layers, and the engine-thread issue queue (what CUDA uses) issues, fails and defers as the copy
thread would."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from lora_factory import TINY, TINY_SHAPES, save_adapter
from torch.overrides import TorchFunctionMode
from transformers import LlamaConfig, LlamaForCausalLM

from hotlora.adapters.cache import LoraSlotCache
from hotlora.adapters.peft_format import load_peft_adapter
from hotlora.adapters.poolwrite import file_order
from hotlora.adapters.registry import AdapterRegistry
from hotlora.adapters.staging import StagedAdapter, parse_staged, read_raw

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _registry(layers: int, dtype: torch.dtype = torch.float32, slots: int = 2) -> AdapterRegistry:
    cache = LoraSlotCache(TINY_SHAPES, layers, slots, slots * 8, torch.device("cpu"), dtype)
    return AdapterRegistry(cache, TINY_SHAPES, layers, 8, 1 << 30)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """peft-saved adapters on tiny Llamas of 2 and 12 layers (12: safetensors stores layer 10 before 2)."""
    root = tmp_path_factory.mktemp("poolwrite")
    out = {}
    for layers in (2, 12):
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(**(TINY | {"num_hidden_layers": layers})))
        out[f"all{layers}"] = save_adapter(base, root / f"all{layers}", r=8, target_modules=ALL)
        base = LlamaForCausalLM(LlamaConfig(**(TINY | {"num_hidden_layers": layers})))
        out[f"some{layers}"] = save_adapter(base, root / f"some{layers}", r=4, seed=1,
                                            target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    return out


def _staged(registry: AdapterRegistry, name: str) -> StagedAdapter:
    v = registry.resolve(name)
    deadline = time.monotonic() + 30
    while (host := registry._host(v)) is None:
        assert time.monotonic() < deadline, "the read did not finish"
        time.sleep(0.01)
    return host


@pytest.mark.parametrize("layers", [2, 12])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_stacked_writes_match_peft_weights(folders, layers, pool_dtype):
    registry = _registry(layers, pool_dtype)
    cache = registry.cache
    for name in (f"all{layers}", f"some{layers}"):
        registry.register(name, folders[name])
        host = _staged(registry, name)
        targets = host.config.target_modules
        full = name.startswith("all")
        assert set(host.stacks) == (targets if full else set())  # layers_to_transform=[1]: no stack
        if full:
            assert {s.order for pair in host.stacks.values() for s in pair} == {file_order(layers)}
        slot = cache.load(registry.resolve(name), host)
        start = int(cache.row_start[slot])
        ref = load_peft_adapter(folders[name], name)
        r = ref.config.rank
        for layer in range(layers):
            for m in targets:
                pool = cache.layers[layer][m]
                out_f, in_f = TINY_SHAPES[m]
                a, b = ref.weights.get((layer, m), (torch.zeros(r, in_f), torch.zeros(out_f, r)))
                torch.testing.assert_close(pool.a[start : start + r], a.to(pool_dtype), rtol=0, atol=0)
                torch.testing.assert_close(pool.b[start : start + r], b.T.to(pool_dtype), rtol=0, atol=0)
    assert file_order(12)[:4] == (0, 1, 10, 11)
    registry.close()


class _Count(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _copy_calls(folder: Path, layers: int) -> int:
    """Torch calls of one copy's pool writes, reading a second buffer as the device copy does on CUDA (so that
    no view made at parse time is reused)."""
    registry = _registry(layers)
    registry.register("a", folder)
    host = _staged(registry, "a")
    raw = host.raw.clone()
    with _Count() as count:
        registry.cache.writer.write_from(0, host, raw)
    registry.close()
    return count.calls


def test_torch_calls_per_copy_do_not_grow_with_layers(folders):
    """Seven stacked modules: per module a strided view per side, the pool rows per side, the transpose of B
    and one copy per side (7); then the buffer viewed as its dtype and the finiteness check (3 + 3), after a cast
    to the pools' dtype where that is narrower (1). The per-layer path made 4 calls per layer and module (954 for
    the Llama-3-8B shape, 32 layers)."""
    two, twelve = _copy_calls(folders["all2"], 2), _copy_calls(folders["all12"], 12)
    assert two == twelve <= 7 * 7 + 7, (two, twelve)


def _parse_calls(folder: Path) -> tuple[int, StagedAdapter]:
    raw = read_raw(folder, pin=False)
    with _Count() as count:
        staged = parse_staged(raw, folder, "a")
    return count.calls, staged


def test_parse_makes_no_torch_call_per_tensor(folders):
    """The reading thread validates a file on its header's Spans: the only torch calls are the buffer's size,
    the header's two slices and their numpy views (each torch call re-takes the GIL the engine thread needs;
    a view per tensor made 900 for the Llama-3-8B shape). The views come later, from the Spans, and equal
    peft's tensors."""
    (two, staged), (twelve, _) = _parse_calls(folders["all2"]), _parse_calls(folders["all12"])
    assert two == twelve <= 5, (two, twelve)
    ref = load_peft_adapter(folders["all2"], "a")
    views = staged.views(staged.raw)
    assert views.keys() == ref.weights.keys() == staged.spans.keys()
    for key, (a, b) in ref.weights.items():
        assert torch.equal(views[key][0], a) and torch.equal(views[key][1], b), key


# --- who issues a copy: the engine-thread queue -----------------------------------------------------------


def _queued_registry(folders, layers: int = 2, slots: int = 2) -> AdapterRegistry:
    registry = _registry(layers, slots=slots)
    registry.cache.copy_thread = False  # CUDA's default: copies wait in the queue for issue_pending
    for name in (f"all{layers}", f"some{layers}"):
        registry.register(name, folders[name])
        _staged(registry, name)
    return registry


def test_queued_copies_wait_for_their_issue_on_the_calling_thread(folders):
    registry = _queued_registry(folders)
    cache, threads = registry.cache, []
    cache.copy_hook = lambda key: threads.append((key.name, threading.current_thread()))
    v = registry.resolve("all2")
    assert registry.acquire(v) is None  # reserved, queued...
    slot = cache.lookup(v)
    time.sleep(0.05)
    assert not cache.poll(slot) and not cache.slots[slot].transfer.done() and threads == []  # ...nobody issued it
    assert cache.issue_pending() == 1 and threads == [("all2", threading.current_thread())]
    assert cache.poll(slot) and registry.acquire(v) == slot
    assert cache.issue_pending() == 0
    registry.close()


def test_a_failing_copy_frees_its_slot_and_the_next_one_is_still_issued(folders):
    registry = _queued_registry(folders)
    cache = registry.cache

    def hook(key) -> None:
        if key.name == "all2":
            raise OSError("injected copy failure")

    cache.copy_hook = hook
    bad, good = registry.resolve("all2"), registry.resolve("some2")
    assert registry.acquire(bad) is None and registry.acquire(good) is None
    assert cache.issue_pending() == 2
    registry.poll()  # publishes the good one; the bad one's slot is freed, its requests fail on v.error
    assert cache.lookup(bad) is None and "injected copy failure" in bad.error
    assert registry.is_ready(good)
    registry.close()


def test_a_busy_copy_lock_defers_the_issue_after_a_launch(folders):
    registry = _queued_registry(folders)
    cache = registry.cache
    v = registry.resolve("all2")
    registry.acquire(v)
    with cache.copy_lock:  # e.g. a reading thread allocating pinned memory
        assert cache.issue_pending(wait=False) == 0  # after a launch: left for the next launch
        registry.poll()
        assert not registry.is_ready(v)
    assert cache.issue_pending(wait=False) == 1
    registry.poll()
    assert registry.is_ready(v)
    registry.close()


def test_load_issues_its_own_copy_and_close_cancels_queued_ones(folders):
    registry = _queued_registry(folders, slots=3)
    cache = registry.cache
    queued = registry.resolve("some2")
    registry.acquire(queued)
    pinned = registry.resolve("all2")
    slot = cache.load(pinned, pinned.host)  # the admin pin waits for its copy: issued right there, with the
    assert cache.slots[slot].ready  # one queued before it
    transfer = cache.slots[cache.lookup(queued)].transfer
    assert transfer.done() and cache.poll(cache.lookup(queued))
    other = LoraSlotCache(TINY_SHAPES, 2, 1, 8, torch.device("cpu"), torch.float32)
    other.copy_thread = False
    other.reserve("x", queued.host)
    job = other._queued[0].future
    other.close()
    assert job.cancelled()
    registry.close()
