"""LaunchPacer (server/engine/pacer.py): the device and host estimates it learns from step timestamps, and the
delay it grants the driver. Times are perf_counter-style seconds given explicitly."""

from __future__ import annotations

import pytest

from hotlora.server.engine import pacer
from hotlora.server.engine.pacer import LaunchPacer


def run_steps(p: LaunchPacer, n: int, tokens: int, device: float, host: float, t: float = 0.0,
              decode: bool = True) -> float:
    """n back-to-back steps as asynchronous scheduling runs them: each built in `host` seconds and submitted
    while the one before still runs (device time `device`), the host then waiting for that one. Returns the
    time the last step was submitted (it stays in flight)."""
    prev, prev_end = None, t
    for _ in range(n):
        step = object()
        t += host
        p.built(host)
        p.launched(step, tokens, t, decode)
        if prev is not None:
            p.completed(prev, t, prev_end)  # the host waited from t to the previous step's end
        start = max(t, prev_end)
        prev, prev_end = step, start + device
        last = t
    p.in_flight = prev  # for the tests
    return last


def test_exact_waits_teach_the_device_time_and_the_delay_follows():
    p = LaunchPacer()
    run_steps(p, 20, tokens=30, device=0.005, host=0.001)
    assert p.device[32] == pytest.approx(0.005, rel=1e-6)
    assert p.host == pytest.approx(0.001)
    # the last step started when the one before ended; at that moment the driver may wait until the host's
    # cushion before its end
    start = p._queue[0].start
    cushion = pacer.HOST_FACTOR * 0.001 + pacer.MARGIN + pacer.MARGIN_SHARE * 0.005
    assert p.delay(p.in_flight, start) == pytest.approx(0.005 - cushion)
    assert p.delay(p.in_flight, start + 0.004) == 0.0  # past the point: build now
    assert p.delay(object(), start) == 0.0  # not the step in flight


def test_no_estimate_means_no_wait():
    p = LaunchPacer()
    step = object()
    p.built(0.001)
    p.launched(step, 30, 1.0, True)
    assert p.delay(step, 1.0) == 0.0  # no step of 32 tokens timed yet
    p.completed(step, 1.0, 1.0)  # the host found it done: an upper bound only, no estimate from it
    assert 32 not in p.device


def test_buckets_are_kept_apart():
    p = LaunchPacer()
    run_steps(p, 10, tokens=30, device=0.005, host=0.001)
    run_steps(p, 10, tokens=300, device=0.012, host=0.001, t=1.0)
    assert p.device[32] == pytest.approx(0.005) and p.device[512] == pytest.approx(0.012)
    assert pacer.bucket(1) == 1 and pacer.bucket(33) == 64 and pacer.bucket(64) == 64


def test_a_step_found_done_early_drops_the_estimate_and_the_next_exact_wait_relearns_it():
    p = LaunchPacer()
    run_steps(p, 10, tokens=8, device=0.010, host=0.001)
    assert p.device[8] == pytest.approx(0.010)
    a, b = object(), object()
    p.launched(a, 8, 2.0, True)
    p.completed(a, 2.020, 2.020)  # found done 20 ms after its start: says nothing (it may have ended earlier)
    assert p.device[8] == pytest.approx(0.010)
    p.launched(b, 8, 3.0, True)
    p.completed(b, 3.008, 3.008)  # found done within 8 ms: the 10-ms estimate is too large, by an unknown amount
    assert 8 not in p.device
    run_steps(p, 2, tokens=8, device=0.004, host=0.001, t=4.0)  # unpaced, waited for: exact again
    assert p.device[8] == pytest.approx(0.004)


def test_one_slow_step_costs_the_device_at_most_one_idle_step():
    """A simulated device under the driver's call order: after one 200-ms hiccup among 10-ms decode steps, the
    pacer oversleeps once (the hiccup inflated its estimate) and then stops, instead of easing the estimate
    down a margin per step while the device idles."""
    p, device, host = LaunchPacer(), 0.010, 0.002
    now, prev, prev_end, idle_steps = 0.0, None, 0.0, 0
    for i in range(40):
        if prev is not None:
            now += p.delay(prev, now)  # the driver's wait
        step = object()
        now += host  # build
        p.built(host)
        p.launched(step, 8, now, True)
        if prev is not None:
            done = max(now, prev_end)
            p.completed(prev, now, done)
            now = done
        start = max(now, prev_end)
        idle_steps += start > prev_end + 1e-9 and i > 0
        prev, prev_end = step, start + (0.2 if i == 10 else device)
    assert idle_steps <= 2


def test_steps_with_prompt_tokens_are_neither_timed_nor_paced():
    p = LaunchPacer()
    run_steps(p, 10, tokens=300, device=0.012, host=0.001, decode=False)
    assert p.device == {}
    assert p.delay(p.in_flight, p._queue[0].start) == 0.0
    run_steps(p, 10, tokens=300, device=0.012, host=0.001, t=1.0)  # 300 decode rows (batch 300)
    assert p.device == {512: pytest.approx(0.012)}
    prefill = object()
    p.launched(prefill, 300, 2.0, False)
    p.completed(p.in_flight, 2.0, 2.0)
    assert p._queue[0].handle is prefill and p.delay(prefill, 2.0) == 0.0  # same bucket, but not a decode step


def test_the_delay_is_clamped_and_stale_steps_are_dropped():
    p = LaunchPacer()
    run_steps(p, 10, tokens=8, device=10.0, host=0.001)
    assert p.delay(p.in_flight, p._queue[0].start) == pacer.MAX_DELAY
    # the step in flight never completes (its step failed); the next two do
    later, nxt = object(), object()
    p.launched(later, 8, 100.0, True)
    assert p.delay(later, 100.0) == 0.0  # one still ahead of it: no estimate of when the device is free
    p.completed(later, 100.0, 100.0)  # drops the stale one with it
    p.launched(nxt, 8, 101.0, True)
    assert len(p._queue) == 1 and p._queue[0].handle is nxt and p._queue[0].start == 101.0
