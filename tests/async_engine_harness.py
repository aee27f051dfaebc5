"""The real LLMEngine and AsyncEngine helpers the AsyncEngine tests share (tests/test_server_async_engine*.py):
one engine per test module (the default model, unquantized, small KV cache), wrapped by each test in a fresh
AsyncEngine that it leaves idle."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest

from hotlora.server.engine.async_engine import AsyncEngine
from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
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


async def _collect(stream) -> list[RequestOutput]:
    return [o async for o in stream]
