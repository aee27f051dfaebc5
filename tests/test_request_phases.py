"""Request-phase timestamps in the engine (queued, first scheduled, first token on the host, finished) and
vLLM's request-phase histograms built from them (server/api/metrics.py); bench/serve_metrics.py's reading of
those histograms. The same through a real server: tests/test_server_request_phases.py."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from hotlora.server.api.metrics import Metrics
from hotlora.server.engine.types import FinishReason, Request, RequestTiming, SamplingParams

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def tiny_small_kv(hotlora_cache):
    """random:tiny with 10 blocks of 4 tokens and 8 tokens per step: three ~20-token requests preempt, and every
    prompt is prefilled in chunks."""
    from hotlora.server.engine.config import EngineConfig
    from hotlora.server.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model="random:tiny", quant="none", cache_dir=hotlora_cache, num_kv_blocks=10,
                                  block_size=4, max_num_batched_tokens=8, enable_prefix_caching=False))


def test_timestamps_keep_the_first_scheduling_across_preemption(tiny_small_kv):
    eng = tiny_small_kv
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    t_add = time.monotonic()
    for i in range(3):
        eng.add_request(Request(f"r{i}", [100 + 7 * i + k for k in range(14)], params))
    first_scheduled: dict[str, float] = {}
    first_output: dict[str, tuple[float, float]] = {}  # the first token's output: (before, after) its step
    finals = {}
    while eng.has_unfinished():
        before = time.monotonic()
        outs = eng.step()
        after = time.monotonic()
        for seq in eng.scheduler.running:
            first_scheduled.setdefault(seq.request_id, seq.scheduled_ts)
        for out in outs:
            first_output.setdefault(out.request_id, (before, after))
            assert (out.timing is not None) == out.finished  # only the finished output carries it
            if out.finished:
                finals[out.request_id] = out
    assert eng.scheduler.num_preemptions > 0
    assert set(finals) == {"r0", "r1", "r2"}
    for rid, out in finals.items():
        t = out.timing
        assert out.finish_reason is FinishReason.LENGTH and out.completion_tokens == 10
        assert t_add <= t.queued <= t.scheduled <= t.first_token <= t.finished
        assert t.scheduled == first_scheduled[rid]  # a preempted request keeps its first scheduling
        before, after = first_output[rid]
        assert before <= t.first_token <= after  # taken in the step that produced the first token


def test_arrival_time_of_the_request_starts_the_queue(tiny_small_kv):
    eng = tiny_small_kv
    arrival = time.monotonic() - 5.0  # e.g. it waited in AsyncEngine's command queue
    (out,) = eng.generate([Request("late", [300, 301, 302], SamplingParams(max_tokens=2, temperature=0.0),
                                   arrival_time=arrival)])
    assert out.finished and eng.blocks.num_used == 0
    assert out.timing.queued == arrival and out.timing.scheduled - arrival >= 5.0


def _value(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_histograms_record_how_far_a_request_got():
    m = Metrics()
    m.phases.observe(RequestTiming(queued=10.0, finished=10.5), first_seen=0.0)  # never scheduled: nothing
    assert _value(m, "vllm:request_queue_time_seconds_count") == 0
    m.phases.observe(RequestTiming(queued=10.0, scheduled=10.25, finished=11.0), first_seen=0.0)  # no token
    assert _value(m, "vllm:request_queue_time_seconds_sum") == 0.25
    assert _value(m, "vllm:request_prefill_time_seconds_count") == 0
    m.phases.observe(RequestTiming(queued=20.0, scheduled=20.5, first_token=21.0, finished=23.0), first_seen=21.125)
    assert _value(m, "vllm:request_queue_time_seconds_count") == 2
    assert _value(m, "vllm:request_queue_time_seconds_sum") == 0.75
    assert _value(m, "vllm:request_prefill_time_seconds_sum") == 0.5
    assert _value(m, "vllm:request_decode_time_seconds_sum") == 2.0
    assert _value(m, "vllm:request_inference_time_seconds_sum") == 2.5
    assert _value(m, "hotlora_request_first_token_delivery_seconds_sum") == 0.125
    # vLLM's boundaries are all there (a dashboard's le="0.3" still matches), with finer ones below them
    assert _value(m, "vllm:request_queue_time_seconds_bucket", le="0.3") == 1  # 0.25 s; 0.5 s above
    assert _value(m, "vllm:request_queue_time_seconds_bucket", le="0.5") == 2
    text = generate_latest(m.registry).decode()
    assert 'vllm:request_prefill_time_seconds_bucket{le="0.3"} 0.0' in text
    assert 'vllm:request_prefill_time_seconds_bucket{le="0.5"} 1.0' in text
    assert 'vllm:request_prefill_time_seconds_bucket{le="0.015"}' in text


def test_request_timer_splits_ttft_into_the_parts():
    """TTFT = queue + prefill + delivery, on the same clock, for one request through RequestTimer."""
    from hotlora.server.engine.types import RequestOutput

    m = Metrics()
    start = time.monotonic()
    timer = m.timer(None, start)
    first = time.monotonic()
    timer.output(RequestOutput("r", "a", [5]))
    timing = RequestTiming(queued=start, scheduled=start + (first - start) / 3, first_token=start + (first - start) / 2,
                           finished=time.monotonic())
    timer.output(RequestOutput("r", "b", [6], finished=True, finish_reason=FinishReason.LENGTH, timing=timing))
    parts = sum(_value(m, f"{n}_sum") for n in ("vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                                                "hotlora_request_first_token_delivery_seconds"))
    ttft = _value(m, "hotlora_time_to_first_token_seconds_sum")
    assert ttft > 0 and parts == pytest.approx(ttft, abs=1e-9)
    assert _value(m, "vllm:time_to_first_token_seconds_sum") == ttft
    assert _value(m, "vllm:e2e_request_latency_seconds_count") == 1


def _serve_metrics():
    spec = importlib.util.spec_from_file_location("bench_serve_metrics", BENCH / "serve_metrics.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_reads_parts_from_histogram_deltas():
    sm = _serve_metrics()
    m = Metrics()
    # values off the bucket boundaries (a difference of two floats may land on either side of one)
    for queue, prefill in [(0.0008, 0.018)] * 50 + [(0.0035, 0.055)] * 49 + [(2.0, 0.33)]:
        m.phases.observe(RequestTiming(queued=1.0, scheduled=1.0 + queue, first_token=1.0 + queue + prefill,
                                       finished=5.0), first_seen=1.0 + queue + prefill + 0.0004)
    samples = [sm.histogram_sample(line) for line in generate_latest(m.registry).decode().splitlines()]
    delta = dict(s for s in samples if s is not None)
    parts = sm.ttft_parts(delta)
    assert set(parts) == {"queue", "prefill", "delivery"} and all(p["n"] == 100 for p in parts.values())
    assert parts["queue"]["mean"] == pytest.approx(1000 * (50 * 0.0008 + 49 * 0.0035 + 2.0) / 100, abs=1e-3)
    assert parts["prefill"]["mean"] == pytest.approx(1000 * (50 * 0.018 + 49 * 0.055 + 0.33) / 100, abs=1e-3)
    # p50 lies in the bucket holding the 50th value, p99 in the one holding the 99th
    assert 0.5 <= parts["queue"]["p50"] <= 1.0 and 3.0 <= parts["queue"]["p99"] <= 5.0
    assert 15.0 <= parts["prefill"]["p50"] <= 20.0 and 40.0 <= parts["prefill"]["p99"] <= 60.0
    assert 0.25 <= parts["delivery"]["p50"] <= 0.5
    assert sm.quantile([(1.0, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert sm.quantile([(1.0, 0.0), (float("inf"), 4.0)], 0.5) == 1.0  # beyond the last bound: that bound
    assert sm.ttft_parts({}) == {}
