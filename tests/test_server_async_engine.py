"""AsyncEngine: the engine thread, its command queue, streams, aborts and shutdown, on the real LLMEngine.

One LLMEngine (the default model, unquantized, small KV cache) is built per module; each test wraps it in a
fresh AsyncEngine (`lambda: engine`) and leaves it idle. Failures are injected into that real engine for one
call (runner.launch, has_unfinished), never through a stand-in. Each shutdown closes the registry's loader
pool, so these tests use no adapters.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from pathlib import Path

import pytest

from hotlora.adapters.registry import UnknownAdapterError
from hotlora.server.engine import pacer
from hotlora.server.engine.async_engine import AsyncEngine, EngineDeadError
from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import EngineStats, InvalidRequestError, LLMEngine
from hotlora.server.engine.types import FinishReason, Request, RequestOutput, SamplingParams

PROMPTS = {"a": "Hello, my name is", "b": "1, 2, 3, 4,"}
LONG = 200  # max_tokens of a request that must be cut short: far more steps than any test waits for


def config(cache: Path, **kw) -> EngineConfig:
    fields = dict(model="default", quant="none", cache_dir=cache, max_loras=1, max_lora_rank=8, max_model_len=256,
                  num_kv_blocks=64, block_size=16)
    return EngineConfig(**(fields | kw))


@pytest.fixture(scope="module")
def engine(hotlora_cache) -> LLMEngine:
    return LLMEngine(config(hotlora_cache))


@pytest.fixture(scope="module")
def ids(engine) -> dict[str, list[int]]:
    return {k: engine.tokenizer.encode(p) for k, p in PROMPTS.items()}


@pytest.fixture(scope="module")
def reference(engine, ids) -> dict[tuple[str, int], RequestOutput]:
    """Offline greedy generations (the engine stepped directly, before any AsyncEngine), by (prompt, max_tokens)."""
    sizes = {"a": (2, 16), "b": (2,)}
    reqs = [req(f"ref-{k}-{n}", ids[k], n) for k, ns in sizes.items() for n in ns]
    outs = engine.generate(reqs)
    assert idle(engine)
    return {(k, n): o for (k, ns) in sizes.items() for n in ns for o in outs if o.request_id == f"ref-{k}-{n}"}


def req(rid: str, prompt: list[int], max_tokens: int = 3, adapter: str | None = None) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), adapter)


def idle(engine: LLMEngine) -> bool:
    """No sequence, nothing scheduled, no KV block held. Read it in the engine thread, or with no thread running."""
    s = engine.stats()
    return engine.seqs == {} and (s.num_running, s.num_waiting, s.kv_blocks_used, engine.blocks.num_used) == (0,) * 4


async def started(engine: LLMEngine) -> AsyncEngine:
    assert idle(engine), "the previous test left work in the shared engine"
    ae = AsyncEngine(lambda: engine)
    ae.start()
    await ae.wait_ready()
    assert ae.ready.is_set() and ae.engine is engine
    return ae


async def until(cond, timeout: float = 30.0) -> None:
    """Poll cond() (a value or an awaitable) until it is truthy."""
    for _ in range(int(timeout / 0.01)):
        value = cond()
        if await value if inspect.isawaitable(value) else value:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def stopped(ae: AsyncEngine) -> None:
    await ae.shutdown()
    assert ae.stopped.is_set() and not ae._thread.is_alive()
    assert idle(ae.engine)


def check_stream(outs: list[RequestOutput], ref: RequestOutput) -> None:
    """One token per output, in order, the last one (only) finished by length; the text is the offline text."""
    n = len(ref.new_token_ids)
    assert [o.new_token_ids for o in outs] == [[t] for t in ref.new_token_ids]
    assert [o.completion_tokens for o in outs] == list(range(1, n + 1))
    assert [o.finished for o in outs] == [False] * (n - 1) + [True]
    assert outs[-1].finish_reason == FinishReason.LENGTH and outs[-1].error is None
    assert "".join(o.new_text for o in outs) == ref.new_text


def test_generate_streams_in_order_and_concurrently(engine, ids, reference):
    async def main():
        ae = await started(engine)
        a: list[RequestOutput] = []
        b: list[RequestOutput] = []
        a_running_after_b = None

        async def run_a():
            nonlocal a_running_after_b
            async for out in ae.generate(req("a", ids["a"], 16)):
                a.append(out)
                if len(a) == 1:  # b arrives while a runs, and (2 tokens) finishes long before a's 16
                    b[:] = [o async for o in ae.generate(req("b", ids["b"], 2))]
                    a_running_after_b = await ae.call(lambda: "a" in engine.seqs)

        await run_a()
        check_stream(a, reference["a", 16])
        check_stream(b, reference["b", 2])
        assert a_running_after_b is True  # the two were in flight together
        assert ae._streams == {}
        await stopped(ae)

    asyncio.run(main())


def test_add_errors_reach_the_caller_and_leave_nothing_behind(engine, ids):
    async def main():
        ae = await started(engine)
        with pytest.raises(UnknownAdapterError):
            await ae.add(req("x", ids["a"], adapter="nope"))
        with pytest.raises(InvalidRequestError, match="empty"):
            await ae.add(req("y", []))
        assert ae._streams == {} and await ae.call(idle, engine)
        await stopped(ae)

    asyncio.run(main())


def test_call_runs_in_the_engine_thread_and_returns_results_and_exceptions(engine):
    async def main():
        ae = await started(engine)
        thread = await ae.call(threading.current_thread)
        assert thread.name == "hotlora-engine" and thread is ae._thread and thread is not threading.current_thread()
        assert await ae.call(lambda a, b: a + b, 2, 3) == 5
        stats = await ae.call(engine.stats)
        assert isinstance(stats, EngineStats) and stats.kv_blocks_total == 64
        with pytest.raises(ZeroDivisionError):
            await ae.call(lambda: 1 / 0)
        assert await ae.call(lambda: "still alive") == "still alive"
        await stopped(ae)
        with pytest.raises(EngineDeadError):
            await ae.call(lambda: 1)

    asyncio.run(main())


async def running_seq(ae: AsyncEngine, rid: str):
    """The engine's Sequence for rid, once it holds KV blocks."""
    engine = ae.engine
    seq = await ae.call(lambda: engine.seqs[rid])
    assert await ae.call(lambda: engine.blocks.num_used) > 0
    return seq


async def check_aborted(ae: AsyncEngine, seq) -> None:
    """The sequence was aborted (not finished by length) and its KV blocks went back."""
    await until(lambda: ae.call(idle, ae.engine))
    assert seq.finish_reason == FinishReason.ABORT and seq.num_generated < LONG


def test_cancelled_consumer_aborts_its_sequence(engine, ids):
    async def main():
        ae = await started(engine)
        seen = []

        async def consume():
            async for out in ae.generate(req("long", ids["a"], LONG)):
                seen.append(out)

        task = asyncio.create_task(consume())
        await until(lambda: len(seen) >= 2)
        seq = await running_seq(ae, "long")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await check_aborted(ae, seq)
        assert ae._streams == {} and not any(o.finished for o in seen)
        await stopped(ae)

    asyncio.run(main())


def test_breaking_out_of_a_stream_aborts_it(engine, ids):
    async def main():
        ae = await started(engine)
        stream = await ae.add(req("s", ids["a"], LONG))
        async for out in stream:
            assert out.new_token_ids and not out.finished
            break
        seq = await running_seq(ae, "s")
        stream.close()
        stream.close()  # twice is harmless
        await check_aborted(ae, seq)
        assert ae._streams == {}
        assert [o async for o in stream] == []  # a closed stream yields nothing more
        await stopped(ae)

    asyncio.run(main())


def fail_first_launch(engine: LLMEngine, monkeypatch, before=lambda: None) -> list[list[str]]:
    """The engine's next model launch raises (after `before()`), the later ones run; returns the failed step's
    request ids, once it has failed."""
    real, failed = engine.runner.launch, []

    def fails_once(batch, *args):
        if not failed:
            failed.append([s.request_id for s in batch.seqs])
            before()
            raise RuntimeError("injected")
        return real(batch, *args)

    monkeypatch.setattr(engine.runner, "launch", fails_once)
    return failed


def test_a_failing_step_fails_the_running_requests_and_the_loop_goes_on(engine, ids, reference, monkeypatch):
    async def main():
        ae = await started(engine)
        failed = fail_first_launch(engine, monkeypatch)
        stream = await ae.add(req("doomed", ids["a"], LONG))
        outs = [o async for o in stream]
        assert failed == [["doomed"]]
        assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason == FinishReason.ABORT
        assert outs[0].error == "internal engine error"
        assert await ae.call(idle, engine)
        after = [o async for o in ae.generate(req("after", ids["a"], 2))]
        check_stream(after, reference["a", 2])
        await stopped(ae)

    asyncio.run(main())


def test_a_request_queued_behind_a_failing_step_is_not_added_after_it(engine, ids, monkeypatch):
    """The failing step ends every open stream, the one whose add still waits in the queue too: that add must not
    then run, or its sequence would decode to the end with no stream to read it."""

    async def main():
        ae = await started(engine)

        def second_queued() -> None:  # the second request's stream is open, its add queued behind the failure
            while len(ae._streams) < 2:
                time.sleep(0.001)

        fail_first_launch(engine, monkeypatch, second_queued)
        first = await ae.add(req("doomed", ids["a"], LONG))
        with pytest.raises(EngineDeadError, match="queued"):
            await ae.add(req("queued", ids["b"], LONG))
        outs = [o async for o in first]
        assert outs[-1].error == "internal engine error"
        assert await ae.call(idle, engine) and ae._streams == {}
        await stopped(ae)

    asyncio.run(main())


def test_deferred_outputs_are_handed_over_once_the_next_step_is_launched(engine, ids, reference, monkeypatch):
    """On an asynchronous device a step's outputs reach the event loop from the next step's launch, while the
    device computes it; the last ones (nothing left to run) at once. Same tokens, same order."""

    async def main():
        monkeypatch.setattr(engine, "defers_outputs", True)
        ae = await started(engine)
        in_launch, handovers = [False], []
        real_step, real_call_soon = engine.step, ae._call_soon

        def step(on_launch=None):
            def launched():
                in_launch[0] = True
                try:
                    on_launch()
                finally:
                    in_launch[0] = False

            return real_step(on_launch=launched if on_launch else None)

        def call_soon(fn, *args):
            if fn == ae._deliver:
                handovers.append(in_launch[0])
            real_call_soon(fn, *args)

        monkeypatch.setattr(engine, "step", step)
        monkeypatch.setattr(ae, "_call_soon", call_soon)
        outs = [o async for o in ae.generate(req("a", ids["a"], 16))]
        check_stream(outs, reference["a", 16])
        assert len(handovers) >= 15 and all(handovers[:-1]) and handovers[-1] is False
        await stopped(ae)

    asyncio.run(main())


def test_held_outputs_arrive_when_the_rest_is_aborted_before_the_next_step(engine, ids, monkeypatch):
    """A step's outputs held for the next launch are handed over when no next step comes: here the only other
    request is aborted right after the step that finished "a" (its final output would otherwise wait forever)."""

    async def main():
        monkeypatch.setattr(engine, "defers_outputs", True)
        ae = await started(engine)
        real_step = engine.step

        def step(on_launch=None):
            outs = real_step(on_launch=on_launch)
            if any(o.request_id == "a" and o.finished for o in outs):
                ae.abort("long")  # queued: drained after this step's outputs are held, before any next step
            return outs

        monkeypatch.setattr(engine, "step", step)
        await ae.add(req("long", ids["b"], LONG))
        outs = await asyncio.wait_for(_collect(ae.generate(req("a", ids["a"], 3))), timeout=30)
        assert outs[-1].finished and sum(len(o.new_token_ids) for o in outs) == 3
        assert await ae.call(idle, engine)
        await stopped(ae)

    asyncio.run(main())


async def _collect(stream) -> list[RequestOutput]:
    return [o async for o in stream]


def test_factory_failure_is_reported_by_wait_ready(hotlora_cache, tmp_path):
    async def main():
        missing = tmp_path / "no-such-model"
        ae = AsyncEngine(lambda: LLMEngine(config(hotlora_cache, model=str(missing))))
        ae.start()
        with pytest.raises(FileNotFoundError, match="no-such-model"):
            await ae.wait_ready()
        assert ae.stopped.is_set() and not ae.ready.is_set() and isinstance(ae.error, FileNotFoundError)
        with pytest.raises(EngineDeadError):
            await ae.add(req("x", [1, 2, 3]))
        with pytest.raises(EngineDeadError):
            await ae.call(lambda: 1)
        await ae.shutdown()  # after a failed start: returns at once

    asyncio.run(main())


def test_shutdown_aborts_in_flight_requests(engine, ids):
    async def main():
        ae = await started(engine)
        stream = await ae.add(req("a", ids["a"], LONG))
        first = await anext(stream)
        assert not first.finished
        seq = await running_seq(ae, "a")
        await stopped(ae)  # the thread has ended: the engine may be read from here
        assert seq.finish_reason == FinishReason.ABORT and seq.num_generated < LONG
        rest = [o async for o in stream]  # the open stream is ended, not left waiting
        assert rest and rest[-1].finished and rest[-1].error == "the engine stopped"
        assert ae._streams == {}
        with pytest.raises(EngineDeadError):
            await ae.add(req("late", ids["a"]))

    asyncio.run(main())


def test_streams_end_when_the_engine_loop_dies(engine, ids, monkeypatch):
    async def main():
        ae = await started(engine)
        stream = await ae.add(req("orphan", ids["a"], LONG))
        await anext(stream)

        def dead() -> bool:
            raise RuntimeError("injected")

        await ae.call(monkeypatch.setattr, engine, "has_unfinished", dead)  # the loop's next check raises
        outs = [o async for o in stream]
        assert outs[-1].finished and outs[-1].finish_reason == FinishReason.ABORT
        assert outs[-1].error == "the engine stopped"
        assert ae.stopped.is_set() and ae._streams == {}
        ae._thread.join(5)
        assert not ae._thread.is_alive()
        with pytest.raises(EngineDeadError):
            await ae.call(lambda: 1)
        # The dead loop left the sequence in the engine; free it so the shared engine is idle again.
        monkeypatch.undo()
        assert "orphan" in engine.seqs
        engine.abort("orphan")
        assert idle(engine)

    asyncio.run(main())


def test_asynchronous_scheduling_streams_the_same_tokens(engine, ids, reference, monkeypatch):
    """With a step left in flight (asynchronous scheduling, as on CUDA), concurrent streams get the reference
    tokens in order, and an abort mid-stream frees everything, the step in flight included."""

    async def main():
        monkeypatch.setattr(engine, "defers_outputs", True)
        monkeypatch.setattr(engine, "async_scheduling", True)
        ae = await started(engine)
        streams = [ae.generate(req("a", ids["a"], 16)), ae.generate(req("b", ids["b"], 2))]
        outs = await asyncio.wait_for(asyncio.gather(*(_collect(s) for s in streams)), timeout=60)
        check_stream(outs[0], reference["a", 16])
        check_stream(outs[1], reference["b", 2])
        stream = await ae.add(req("long", ids["a"], LONG))
        first = await asyncio.wait_for(stream.__anext__(), timeout=30)
        assert first.new_token_ids == reference["a", 16].new_token_ids[:1]
        stream.close()
        # the abort frees the sequence at once; the step in flight completes at the next turn of the loop
        await until(lambda: ae.call(lambda: idle(engine) and not engine.in_flight))
        await stopped(ae)

    asyncio.run(main())


def test_launch_pacing_serves_requests_while_it_waits_for_the_device(engine, ids, reference, monkeypatch):
    """With a decode step in flight the driver waits until the pacer says the device needs the next step (here:
    every decode step is believed to take 0.6 s), executing commands as they come rather than after the wait: a
    call made during the wait is answered before the in-flight step's token is delivered, the tokens are the
    reference's, and a shutdown in the middle of a wait ends the loop."""

    async def main():
        monkeypatch.setattr(engine, "defers_outputs", True)
        monkeypatch.setattr(engine, "async_scheduling", True)
        monkeypatch.setattr(engine.pacer, "device", {pacer.bucket(n): 0.6 for n in range(1, 65)})
        monkeypatch.setattr(pacer, "MAX_DELAY", 1.0)
        ae = await started(engine)
        events: list[str] = []
        outs: list[RequestOutput] = []
        first = asyncio.Event()

        async def run_a():
            async for out in ae.generate(req("a", ids["a"], 2)):
                events.append(f"a{out.completion_tokens}")
                outs.append(out)
                first.set()

        task = asyncio.create_task(run_a())
        # the first token comes back once the second (decode) step is launched: its wait follows
        await asyncio.wait_for(first.wait(), timeout=30)
        await asyncio.sleep(0.05)
        delay = await ae.call(engine.launch_delay)
        events.append("call")
        await asyncio.wait_for(task, timeout=30)
        assert 0 < delay <= 0.6
        assert events == ["a1", "call", "a2"]
        check_stream(outs, reference["a", 2])
        await ae.add(req("long", ids["a"], LONG))
        await until(lambda: ae.call(lambda: engine.in_flight))
        await asyncio.wait_for(stopped(ae), timeout=30)  # the STOP is taken during a wait

    asyncio.run(main())
