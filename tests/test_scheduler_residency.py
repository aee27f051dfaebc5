"""Residency-aware admission in the scheduler (pure Python): ready adapters first, overdue requests
first with a barrier, and the counter of steps held back by adapters."""

from __future__ import annotations

from hotlora.server.engine.block_manager import BlockManager
from hotlora.server.engine.scheduler import Scheduler
from hotlora.server.engine.sequence import Sequence
from hotlora.server.engine.types import SamplingParams

RESIDENT = {"A"}  # adapters usable now; "C" never becomes usable in these tests


def _seq(name: str, adapter: str | None) -> Sequence:
    return Sequence(name, [1, 2, 3], SamplingParams(max_tokens=100), adapter)


def _scheduler(wait: int) -> Scheduler:
    ready = lambda s: s.adapter is None or s.adapter in RESIDENT  # noqa: E731
    return Scheduler(BlockManager(64, 4), 8, 64, admit=ready, release=lambda s: None, ready=ready,
                     max_adapter_wait_steps=wait)


def _admitted(s: Scheduler) -> list[str]:
    """The waiting sequences that this step admits, in admission order."""
    waiting = set(s.waiting)
    return [q.request_id for q in s.schedule().seqs if q in waiting]


def test_ready_adapters_go_first_and_cold_ones_wait_without_blocking():
    s = _scheduler(wait=100)
    for q in (_seq("cold", "C"), _seq("warm", "A"), _seq("base", None)):
        s.add(q)
    assert _admitted(s) == ["warm", "base"]
    assert [q.request_id for q in s.waiting] == ["cold"]
    assert s.num_adapter_blocked_steps == 0  # others ran: the batch was not held back
    s.schedule()
    assert s.num_adapter_blocked_steps == 1  # only the cold one waited, with room in the batch


def test_an_overdue_request_bars_other_adapters_but_not_the_base_model():
    s = _scheduler(wait=3)
    s.add(_seq("cold", "C"))
    for _ in range(3):
        s.schedule()
    s.add(_seq("warm", "A"))
    s.add(_seq("base", None))
    assert _admitted(s) == ["base"]  # "cold" is overdue: "warm" must not take (or hold) a slot now
    assert {q.request_id for q in s.waiting} == {"cold", "warm"}
    RESIDENT.add("C")
    try:
        assert _admitted(s) == ["cold", "warm"]  # overdue first, then the rest
    finally:
        RESIDENT.discard("C")
