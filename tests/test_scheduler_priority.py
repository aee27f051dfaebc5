"""Priority scheduling (--scheduling-policy priority, vLLM's): lower `priority` values are admitted first and preempted
last; first come, first served within a priority and under the default policy. The scheduler in pure Python, then the
engine on the default model (the HTTP field: test_server_api.py)."""

from __future__ import annotations

import pytest

from hotlora.server.engine.block_manager import BlockManager
from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.scheduler import Scheduler
from hotlora.server.engine.sequence import Sequence
from hotlora.server.engine.types import Request, SamplingParams

_arrival = iter(range(1, 10**6))


def _seq(name: str, priority: int, tokens: int = 3) -> Sequence:
    return Sequence(name, list(range(1, tokens + 1)), SamplingParams(max_tokens=100, priority=priority), None,
                    next(_arrival))


def _scheduler(policy: str, blocks: int = 64, seqs: int = 8) -> Scheduler:
    return Scheduler(BlockManager(blocks, 4), seqs, 64, admit=lambda s: True, release=lambda s: None,
                     ready=lambda s: True, policy=policy)


@pytest.mark.parametrize("policy, order", [("priority", ["urgent", "b", "a", "late"]),
                                           ("fcfs", ["a", "b", "urgent", "late"])])
def test_admission_follows_priority_then_arrival(policy, order):
    s = _scheduler(policy, seqs=4)
    for name, priority in (("a", 5), ("b", 1), ("urgent", -3), ("late", 5)):
        s.add(_seq(name, priority))
    assert [q.request_id for q in s.schedule().seqs] == order


def test_a_high_priority_request_waits_for_no_low_priority_one():
    s = _scheduler("priority", seqs=1)
    s.add(_seq("low", 9))
    s.add(_seq("high", 0))
    assert [q.request_id for q in s.schedule().seqs] == ["high"]
    assert [q.request_id for q in s.waiting] == ["low"]


def test_preemption_takes_the_lowest_priority_first():
    """Blocks run out as the running sequences grow: under priority the victims are the highest values (then the
    latest arrival), where first come, first served takes the latest arrivals."""
    for policy, preempted, kept in (("priority", ["low-early", "mid"], ["high-late"]),
                                    ("fcfs", ["high-late", "mid"], ["low-early"])):
        s = _scheduler(policy, blocks=3, seqs=3)
        s.add(_seq("low-early", 7, tokens=4))
        s.add(_seq("mid", 3, tokens=4))
        s.add(_seq("high-late", 0, tokens=4))
        assert len(s.schedule().seqs) == 3  # one 4-token block each: the pool is full
        for q in s.running:
            q.num_computed = 4
            q.token_ids.append(9)  # each needs a second block now
        batch = s.schedule()
        assert [q.request_id for q in batch.preempted] == preempted, policy
        assert [q.request_id for q in s.running] == kept, policy


def test_a_later_higher_priority_request_is_not_the_one_preempted():
    """The lower-priority request admitted first, the higher one later, both growing past the pool: under priority
    the later, higher one keeps its blocks and the earlier, lower one is preempted (under fcfs, the reverse)."""
    for policy, preempted, kept in (("priority", "low-first", "high-later"), ("fcfs", "high-later", "low-first")):
        s = _scheduler(policy, blocks=3, seqs=2)
        s.add(_seq("low-first", 9, tokens=4))
        s.schedule()
        s.add(_seq("high-later", 0, tokens=4))
        s.schedule()
        assert {q.request_id for q in s.running} == {"low-first", "high-later"}  # one block free
        for q in s.running:
            q.num_computed = 4
            q.token_ids.append(9)
        batch = s.schedule()
        assert [q.request_id for q in batch.preempted] == [preempted], policy
        assert [q.request_id for q in s.running] == [kept], policy


def test_priority_is_an_integer():
    for bad in (None, True, 1.5, "1"):
        with pytest.raises(ValueError, match="priority"):
            SamplingParams(priority=bad)


def test_the_engine_runs_requests_by_priority(hotlora_cache):
    engine = LLMEngine(EngineConfig(model="default", quant="none", cache_dir=hotlora_cache, max_loras=1,
                                    max_lora_rank=8, kv_cache_memory=0.1, scheduling_policy="priority", max_num_seqs=1))
    tok = engine.tokenizer
    params = [("a", 5), ("b", 0), ("c", 5), ("d", -1)]
    for rid, priority in params:
        engine.add_request(Request(rid, tok.encode("Once upon a time"),
                                   SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, priority=priority)))
    finished = []
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["d", "b", "a", "c"]
