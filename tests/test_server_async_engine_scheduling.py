"""AsyncEngine under asynchronous scheduling (as on CUDA) on the real LLMEngine: outputs held until the next step is
launched, streams identical to the synchronous engine's, and the launch pacer's wait (commands served during it).
Helpers and fixtures: tests/async_engine_harness.py."""

from __future__ import annotations

import asyncio

import async_engine_harness as harness
from async_engine_harness import LONG, _collect, check_stream, idle, req, started, stopped, until

from hotlora.server.engine import pacer
from hotlora.server.engine.types import RequestOutput

engine, ids, reference = harness.engine, harness.ids, harness.reference  # the shared fixtures (an engine per module)


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
