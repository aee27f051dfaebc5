"""AsyncEngine: the engine thread, its command queue, streams, aborts and shutdown (on a fake engine)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fake_engine import FakeEngine, UnknownAdapterError

from hotlora.server.engine.async_engine import AsyncEngine, EngineDeadError
from hotlora.server.engine.types import Request, SamplingParams


def req(rid: str, max_tokens: int = 3, adapter: str | None = None) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=max_tokens), adapter)


async def started(engine: FakeEngine) -> AsyncEngine:
    ae = AsyncEngine(lambda: engine)
    ae.start()
    await ae.wait_ready()
    return ae


async def until(cond, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_generate_streams_in_order_and_concurrently():
    async def main():
        ae = await started(FakeEngine(step_delay=0.01))

        async def run(rid: str, n: int) -> list[str]:
            return [o.new_text async for o in ae.generate(req(rid, n))]

        a, b = await asyncio.gather(run("a", 3), run("b", 5))
        assert a == ["t1 ", "t2 ", "t3 "] and b == [f"t{i} " for i in range(1, 6)]
        assert ae._streams == {}
        await ae.shutdown()

    asyncio.run(main())


def test_add_errors_reach_the_caller_and_leave_nothing_behind():
    async def main():
        engine = FakeEngine()
        ae = await started(engine)
        with pytest.raises(UnknownAdapterError):
            await ae.add(req("x", adapter="nope"))
        assert ae._streams == {} and engine.seqs == {}
        await ae.shutdown()

    asyncio.run(main())


def test_call_runs_in_the_engine_thread_and_returns_results_and_exceptions():
    async def main():
        engine = FakeEngine()
        ae = await started(engine)
        thread = await ae.call(threading.current_thread)
        assert thread.name == "hotlora-engine"
        assert await ae.call(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ZeroDivisionError):
            await ae.call(lambda: 1 / 0)
        await ae.shutdown()
        with pytest.raises(EngineDeadError):
            await ae.call(lambda: 1)

    asyncio.run(main())


def test_cancelled_consumer_aborts_its_sequence():
    async def main():
        engine = FakeEngine(step_delay=0.01)
        ae = await started(engine)
        seen = []

        async def consume():
            async for out in ae.generate(req("long", 10_000)):
                seen.append(out)

        task = asyncio.create_task(consume())
        await until(lambda: len(seen) >= 2)
        task.cancel()
        await until(lambda: "long" in engine.aborted)
        await until(lambda: not engine.has_unfinished())
        assert ae._streams == {}
        await ae.shutdown()

    asyncio.run(main())


def test_breaking_out_of_a_stream_aborts_it():
    async def main():
        engine = FakeEngine(step_delay=0.01)
        ae = await started(engine)
        stream = await ae.add(req("s", 10_000))
        async for _ in stream:
            break
        stream.close()
        await until(lambda: "s" in engine.aborted)
        await ae.shutdown()

    asyncio.run(main())


def test_a_failing_step_fails_the_running_requests_and_the_loop_goes_on():
    async def main():
        engine = FakeEngine(step_delay=0.01)
        ae = await started(engine)
        stream = await ae.add(req("doomed", 100))
        engine.fail_next_step = True
        outs = [o async for o in stream]
        assert outs[-1].finished and outs[-1].error
        assert [o.new_text async for o in ae.generate(req("after", 2))] == ["t1 ", "t2 "]
        await ae.shutdown()

    asyncio.run(main())


def test_factory_failure_is_reported_by_wait_ready():
    async def main():
        def boom():
            raise RuntimeError("no model here")

        ae = AsyncEngine(boom)
        ae.start()
        with pytest.raises(RuntimeError, match="no model here"):
            await ae.wait_ready()
        with pytest.raises(EngineDeadError):
            await ae.add(req("x"))

    asyncio.run(main())


def test_shutdown_aborts_in_flight_requests():
    async def main():
        engine = FakeEngine(step_delay=0.01)
        ae = await started(engine)
        await ae.add(req("a", 10_000))
        await ae.shutdown()
        assert "a" in engine.aborted and ae.stopped.is_set()

    asyncio.run(main())


def test_streams_end_when_the_engine_loop_dies():
    async def main():
        engine = FakeEngine(step_delay=0.01)
        ae = await started(engine)
        stream = await ae.add(req("orphan", 10_000))
        await ae.call(lambda: setattr(engine, "has_unfinished", lambda: 1 / 0))  # the loop's next check raises
        outs = [o async for o in stream]
        assert outs[-1].finished and outs[-1].error == "the engine stopped"
        assert ae.stopped.is_set()

    asyncio.run(main())
