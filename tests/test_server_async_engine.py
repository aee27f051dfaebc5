"""AsyncEngine: the engine thread, its command queue, streams, aborts and shutdown, on the real LLMEngine.

One LLMEngine (the default model, unquantized, small KV cache) is built per module; each test wraps it in a
fresh AsyncEngine (`lambda: engine`) and leaves it idle. Failures are injected into that real engine for one
call (runner.launch, has_unfinished), never through a stand-in. Each shutdown closes the registry's loader
pool, so these tests use no adapters. Helpers and fixtures: tests/async_engine_harness.py; the tests under
asynchronous scheduling (held outputs, the launch pacer): tests/test_server_async_engine_scheduling.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import async_engine_harness as harness
import pytest
from async_engine_harness import LONG, check_stream, config, idle, req, started, stopped, until

from hotlora.adapters.registry import UnknownAdapterError
from hotlora.server.engine.async_engine import AsyncEngine, EngineDeadError
from hotlora.server.engine.engine import EngineStats, InvalidRequestError, LLMEngine
from hotlora.server.engine.types import FinishReason, RequestOutput

engine, ids, reference = harness.engine, harness.ids, harness.reference  # the shared fixtures (an engine per module)


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


def test_a_first_token_reaches_its_stream_before_the_other_outputs_of_its_step(engine, ids):
    """The outputs of one step are handed over first tokens first: the consumer of a request whose prefill just
    ended runs before the step's decode streams write their chunks (its time to first token waits for none)."""

    async def main():
        ae = await started(engine)
        batches: list[list[tuple[str, int]]] = []
        received: list[tuple[str, int]] = []
        deliver = ae._deliver

        def spy(outputs):
            batches.append([(o.request_id, o.completion_tokens) for o in outputs])
            deliver(outputs)

        ae._deliver = spy

        async def consume(rid, max_tokens):
            async for out in ae.generate(req(rid, ids[rid], max_tokens)):
                received.append((out.request_id, out.completion_tokens))

        task = asyncio.create_task(consume("a", LONG))
        await until(lambda: len(received) >= 2)
        await consume("b", 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        shared = [b for b in batches if ("b", 1) in b and any(rid == "a" for rid, _ in b)]
        assert shared  # b's first token came from a step that also decoded a
        for batch in shared:
            a_out = next(o for o in batch if o[0] == "a")
            assert batch.index(a_out) < batch.index(("b", 1))  # the engine listed a's output first...
            assert received.index(("b", 1)) < received.index(a_out)  # ...and b's consumer still ran first
        await until(lambda: ae._streams == {})
        await stopped(ae)

    asyncio.run(main())


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
    then run, or its sequence would decode to the end with no stream to read it. The second add is made only once
    the failing launch has begun: made earlier, the engine thread could take it before that step, in the same pass
    over its queue as the first add (it then rightly runs and fails with the step; a CI run saw that race)."""

    async def main():
        ae = await started(engine)
        in_launch = threading.Event()

        def second_queued() -> None:  # the second request's stream is open, its add queued behind the failure
            in_launch.set()
            while len(ae._streams) < 2:
                time.sleep(0.001)

        fail_first_launch(engine, monkeypatch, second_queued)
        first = await ae.add(req("doomed", ids["a"], LONG))
        assert await asyncio.to_thread(in_launch.wait, 60)
        with pytest.raises(EngineDeadError, match="queued"):
            await ae.add(req("queued", ids["b"], LONG))
        outs = [o async for o in first]
        assert outs[-1].error == "internal engine error"
        assert await ae.call(idle, engine) and ae._streams == {}
        await stopped(ae)

    asyncio.run(main())


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
