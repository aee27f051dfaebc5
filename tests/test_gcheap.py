"""server/api/gcheap.py: the start-up heap frozen out of the cyclic collector, and collection pauses measured."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry

from hotlora.server.api.gcheap import GcPauses, freeze_startup_heap, thaw


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def _count(registry: CollectorRegistry, generation: str) -> float:
    return registry.get_sample_value("hotlora_gc_pause_seconds_count", {"generation": generation}) or 0.0


def test_pauses_are_timed_per_generation_while_installed():
    registry = CollectorRegistry()
    pauses = GcPauses(registry)
    pauses.install()
    pauses.install()  # once only
    try:
        gc.collect(0)
        gc.collect(2)
        assert _count(registry, "0") >= 1 and _count(registry, "2") >= 1
        assert gc.callbacks.count(pauses._callback) == 1
        total = registry.get_sample_value("hotlora_gc_pause_seconds_sum", {"generation": "2"})
        assert 0 < total < 60
    finally:
        pauses.remove()
    before = _count(registry, "2")
    gc.collect(2)
    assert _count(registry, "2") == before and pauses._callback not in gc.callbacks


def test_freeze_then_thaw():
    """Frozen objects are out of every collection (a frozen cycle survives gc.collect) until thawed."""
    thaw()
    cycle = _Cycle()
    alive = [cycle]
    frozen, seconds = freeze_startup_heap()
    try:
        assert frozen > 0 and seconds >= 0
        # other threads (earlier tests' daemon threads) may free a few frozen objects meanwhile: a CI run saw 2
        assert frozen - 100 <= gc.get_freeze_count() <= frozen
        assert not any(o is cycle for o in gc.get_objects())  # the permanent generation is not listed
    finally:
        thaw()
    assert gc.get_freeze_count() == 0
    assert any(o is cycle for o in gc.get_objects())
    del alive, cycle


def test_two_servers_one_process_thaw_with_the_last():
    """Each server freezes its start-up heap: the first to stop must not thaw the heap of one still running."""
    thaw()
    cycle = _Cycle()
    freeze_startup_heap()  # server A
    freeze_startup_heap()  # server B
    try:
        thaw()  # A stops
        assert gc.get_freeze_count() > 0 and not any(o is cycle for o in gc.get_objects())
    finally:
        thaw()  # B stops
    assert gc.get_freeze_count() == 0 and any(o is cycle for o in gc.get_objects())
    thaw()  # one thaw too many (a server that never froze) changes nothing
    assert gc.get_freeze_count() == 0
    del cycle


def test_a_stop_without_its_start_is_not_a_pause():
    """install() from the event loop thread can land while another thread's collection runs: its "stop" then
    comes without a "start", and must not be recorded as a pause as long as the process has lived."""
    registry = CollectorRegistry()
    pauses = GcPauses(registry)
    pauses._callback("stop", {"generation": 2})
    assert _count(registry, "2") == 0
    pauses._callback("start", {"generation": 1})
    pauses._callback("stop", {"generation": 1})
    pauses._callback("stop", {"generation": 1})  # a second stop (removed and re-installed meanwhile): not counted
    assert _count(registry, "1") == 1
    assert registry.get_sample_value("hotlora_gc_pause_seconds_sum", {"generation": "1"}) < 1
