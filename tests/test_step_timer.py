"""The engine's step timer (server/engine/steptimer.py) on a real random:tiny engine on the CPU: every model step is
recorded once per phase, the phases of a step add up to its wall time, the loop phase is the time between two
busy steps, and nothing is recorded for steps that ran no model. /metrics and bench/serve.py read these histograms
(tests/test_server_api.py, tests/test_bench_serve.py)."""

from __future__ import annotations

import gc
import statistics
import time

import pytest

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.steptimer import PHASES
from hotlora.server.engine.types import Request, SamplingParams

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
GAP = 0.003  # seconds the test's own loop sleeps between two steps


@pytest.fixture(scope="module")
def engine(hotlora_cache) -> LLMEngine:
    # 8 tokens per step: the 11-token prompt is chunked, so prefill, mixed and decode steps all occur
    return LLMEngine(EngineConfig(model="random:tiny", quant="none", cache_dir=hotlora_cache, kv_cache_memory=0.01,
                                  max_num_batched_tokens=8))  # fmt: skip


def _run(engine: LLMEngine, prompts: list[list[int]]) -> list[tuple[float, float, dict[str, float], int]]:
    """Step until done, sleeping GAP between steps: (step wall time, gap before it, its phases, its tokens).
    The collector is off meanwhile: a collection inside a step is time outside every phase."""
    for i, prompt in enumerate(prompts):
        engine.add_request(Request(f"t{time.perf_counter_ns()}-{i}", prompt, PARAMS))
    rows, end = [], None
    gc.disable()
    try:
        while engine.has_unfinished():
            time.sleep(GAP)
            tokens_before = engine.timer.tokens.total
            start = time.perf_counter()
            engine.step()
            now = time.perf_counter()
            rows.append((now - start, 0.0 if end is None else start - end, engine.timer.last,
                         int(engine.timer.tokens.total - tokens_before)))  # fmt: skip
            end = now
    finally:
        gc.enable()
    return rows


def _counts(engine: LLMEngine) -> dict[str, int]:
    return {p: h.count for p, h in engine.timer.phases.items()}


@pytest.mark.parametrize("path", ["eager", "static"])
def test_phases_add_up_to_the_step(engine, path):
    if path == "static":  # the padded CUDA-graph step path, run eagerly: its buffers are filled in prepare
        engine.runner.graphs = engine.runner.step_graphs(capture=False)
    steps_before = engine.runner.eager_steps + engine.runner.graph_steps
    counts_before, tokens_before = _counts(engine), engine.timer.tokens.count
    try:
        rows = _run(engine, [list(range(100, 111)), list(range(200, 203))])
    finally:
        engine.runner.graphs = None
    steps = engine.runner.eager_steps + engine.runner.graph_steps - steps_before
    assert steps == len(rows) >= PARAMS.max_tokens + 1  # the chunked prompt takes two steps
    assert all(n == counts_before[p] + steps for p, n in _counts(engine).items())
    assert engine.timer.tokens.count == tokens_before + steps
    assert sum(n for *_, n in rows) == 11 + 3 + 2 * (PARAMS.max_tokens - 1)  # prompts, then each fed-back token
    inside = [sum(s for p, s in phases.items() if p != "loop") for _, _, phases, _ in rows]
    for (wall, _gap, phases, _), attributed in zip(rows, inside, strict=True):
        assert set(phases) == set(PHASES) and all(s >= 0 for s in phases.values())
        assert attributed <= wall  # the phases are consecutive slices of the step
        assert phases["launch"] > 0 and phases["postprocess"] > 0 and phases["prepare"] > 0
    # everything but a few calls' overhead is attributed: in the median step, so that a step the OS preempts
    # between two marks (a busy 2-core CI machine) does not decide the test
    assert statistics.median(a - 0.9 * wall for (wall, *_), a in zip(rows, inside, strict=True)) >= -1e-4
    assert rows[0][2]["loop"] == 0.0  # the engine was idle before the first step
    for _, gap, phases, _ in rows[1:]:  # later steps: the test's loop (its sleep) is the engine's loop phase
        assert GAP <= gap <= phases["loop"]
    assert statistics.median(phases["loop"] - gap for _, gap, phases, _ in rows[1:]) <= 1e-3


def test_idle_and_empty_steps_reset_the_loop_phase(engine):
    _run(engine, [[7, 8, 9]])
    counts = _counts(engine)
    time.sleep(0.02)  # idle: not engine overhead
    assert engine.step() == [] and _counts(engine) == counts  # no work: no model step, nothing recorded
    rows = _run(engine, [[7, 8, 9, 10]])
    assert rows[0][2]["loop"] == 0.0 and rows[1][2]["loop"] >= GAP
    assert all(n == counts[p] + len(rows) for p, n in _counts(engine).items())
