"""Asynchronous scheduling (LLMEngine.step with a step left in flight) against the synchronous engine.

On CUDA each step is built while the previous one runs, its decode inputs filled in on the device from the
previous step's sample. The CPU computes at launch, so nothing overlaps here, but the same code paths run when
the engine is told to (engine.async_scheduling = True): placeholders, device-side input feeding, void steps after
a stop, drains for host-sampled requests, preemption and aborts while a step is in flight. Every request must
produce exactly what the synchronous engine produces, token for token and text for text, and leave no block held.
"""

from __future__ import annotations

import pytest
from engine_reference import VARIED_PROMPTS, default_engine, drain_outputs

from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams

PROMPTS = [*VARIED_PROMPTS, "Hello, my name is Bob and I like"]


def _engine(cache, adapters, **kw) -> LLMEngine:
    return default_engine(cache, adapters, **({"kv_cache_memory": 0.1, "max_loras": 2} | kw))


def _run(engine: LLMEngine, arrivals: dict[int, list[Request]], asynchronous: bool,
         abort: dict[int, str] | None = None) -> tuple[dict[str, tuple[list[int], str, str]], int]:
    """Step until done: per request (tokens, text, finish reason), and the steps that left one in flight."""
    engine.async_scheduling = asynchronous
    in_flight = []
    got = drain_outputs(engine, arrivals, abort, lambda e: in_flight.append(e.in_flight))
    engine.async_scheduling = False
    assert engine.blocks.num_used == 0 and all(c == 0 for c in engine.blocks.ref_counts)
    engine.blocks.check_idle()
    result = {rid: ([t for o in outs for t in o.new_token_ids], "".join(o.new_text for o in outs),
                    "".join(o.finish_reason.value for o in outs if o.finished)) for rid, outs in got.items()}
    return result, sum(in_flight)


def _workload(engine: LLMEngine, reference: dict | None = None) -> dict[int, list[Request]]:
    """Staggered requests: greedy and seeded draws, base and adapters, max_tokens, and (given a synchronous
    run's tokens) stop token ids and stop strings that end requests mid-stream, plus one penalties request
    (its steps wait for their tokens on the host)."""
    tok = engine.tokenizer
    reqs = []
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(max_tokens=9 + 3 * i, temperature=0.0 if i % 2 else 0.8, seed=i, ignore_eos=True)
        if reference is not None and i == 1:  # stops at its 4th token
            params.stop_token_ids = [reference[f"r{i}"][0][3]]
        if reference is not None and i == 2:  # a stop string inside its text
            text = reference[f"r{i}"][1]
            params.stop = [text[len(text) // 2 : len(text) // 2 + 3]]
        if i == 3:
            params.frequency_penalty = 0.5
        adapter = ["a", None, "b"][i % 3]
        reqs.append(Request(f"r{i}", tok.encode(prompt), params, adapter))
    return {2 * i: [r] for i, r in enumerate(reqs)}


@pytest.fixture(scope="module")
def adapters2(adapters) -> dict[str, object]:
    first, second = sorted(adapters)[:2]
    return {"a": adapters[first], "b": adapters[second]}


@pytest.mark.parametrize("small", [False, True], ids=["roomy", "preempting"])
def test_async_scheduling_matches_the_synchronous_engine(hotlora_cache, adapters2, small):
    """roomy: every request fits; preempting: 12 blocks of 4 tokens and 8-token steps, so sequences are
    preempted (some while their token is in flight) and prompts are prefilled in chunks."""
    kw = {"num_kv_blocks": 12, "block_size": 4, "max_num_batched_tokens": 8} if small else {}
    engine = _engine(hotlora_cache, adapters2, **kw)
    first, _ = _run(engine, _workload(engine), asynchronous=False)
    work = _workload(engine, first)
    sync, _ = _run(engine, work, asynchronous=False)
    asyn, in_flight = _run(engine, work, asynchronous=True)
    assert in_flight > 10  # steps really were left in flight
    assert asyn == sync
    assert sync["r1"][2] == "stop" and len(sync["r1"][0]) == 4  # the stop cases did stop mid-stream
    assert sync["r2"][2] == "stop" and len(sync["r2"][0]) < 15
    if small:
        assert engine.scheduler.num_preemptions > 0


def test_abort_while_a_step_is_in_flight(hotlora_cache, adapters2):
    """An aborted request gets no more output, its blocks come back, and the others are untouched."""
    engine = _engine(hotlora_cache, adapters2)
    work = _workload(engine)
    sync, _ = _run(engine, work, asynchronous=False)
    asyn, _ = _run(engine, work, asynchronous=True, abort={9: "r0"})
    assert {k: v for k, v in asyn.items() if k != "r0"} == {k: v for k, v in sync.items() if k != "r0"}
    tokens = asyn["r0"][0]
    assert tokens == sync["r0"][0][: len(tokens)] and len(tokens) < len(sync["r0"][0])


def test_a_failure_while_completing_a_step_keeps_the_next_one_in_flight(hotlora_cache, adapters2, monkeypatch):
    """step() launches its step before it waits for the previous one: if that wait fails, the launched step is
    still the engine's step in flight (its sequences hold placeholders the device fills), not forgotten."""
    engine = _engine(hotlora_cache, adapters2)
    engine.async_scheduling = True
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request(Request("x", engine.tokenizer.encode(PROMPTS[0]), params))
    engine.step()
    assert engine.in_flight

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    collect = engine.runner.collect
    monkeypatch.setattr(engine.runner, "collect", broken)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    assert engine.in_flight
    monkeypatch.setattr(engine.runner, "collect", collect)
    engine.abort("x")
    while engine.has_unfinished():
        engine.step()
    assert not engine.in_flight and engine.blocks.num_used == 0
    engine.blocks.check_idle()
