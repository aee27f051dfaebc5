"""The server's /metrics for bench/serve.py, read before and after the timed run: the counters it reports
(SERVER_COUNTERS), where the engine's steps spent their time (step_profile), and where the time to first token
went (ttft_parts), all as deltas over the run.

TTFT on the server = queue + prefill + delivery, per request (server/api/metrics.py):

- queue: vllm:request_queue_time_seconds, from the API handing the request to the engine to the first step
  that computes any of its prompt (waiting for a batch slot, KV blocks or its adapter's load);
- prefill: vllm:request_prefill_time_seconds, from there to its first output token on the engine's host;
- delivery: hotlora_request_first_token_delivery_seconds, from there to the API holding that token.

Percentiles come from the bucket counts, interpolated linearly inside the bucket that holds the rank (as
Prometheus' histogram_quantile does; a rank in the +Inf bucket reads as the largest finite bound), so they are
only as fine as the buckets, whose widths run up to the value itself below a second (0.5-1 ms, 1-2 ms; 300 ms
reads as anything in 0.3-0.5 s): compare percentiles between runs, not as absolute times. Means are exact (sum /
count). The parts'
means add up to the server's mean TTFT; their percentiles do not add up.
"""

from __future__ import annotations

import math
import re

import httpx

PARTS = {
    "queue": "vllm:request_queue_time_seconds",
    "prefill": "vllm:request_prefill_time_seconds",
    "delivery": "hotlora_request_first_token_delivery_seconds",
}
_BY_NAME = {v: k for k, v in PARTS.items()}
_HIST = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)_(bucket|sum|count)(?:\{le="([^"]+)"\})?\s+(\S+)$')


def histogram_sample(line: str) -> tuple[str, float] | None:
    """A /metrics line of one of PARTS' histograms as (key, value): ttft_b:<part>:<le> for a (cumulative)
    bucket, ttft_s:<part> for the sum of seconds, ttft_n:<part> for the count; None for any other line."""
    m = _HIST.match(line)
    part = m and _BY_NAME.get(m[1])
    if not part:
        return None
    kind, le, value = m[2], m[3], float(m[4])
    if kind == "bucket":
        return (f"ttft_b:{part}:{le}", value) if le is not None else None
    return f"ttft_{'s' if kind == 'sum' else 'n'}:{part}", value


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram given as sorted (upper bound, cumulative count) pairs, the last
    bound +Inf; None when it holds nothing."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lo, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank and count > below:
            if math.isinf(le):
                return lo
            return lo + (le - lo) * (rank - below) / (count - below)
        lo, below = le, count
    return lo


def ttft_parts(delta: dict[str, float]) -> dict[str, dict[str, float | int | None]]:
    """{part: {p50, p99, mean, n}} in ms over the timed run, from the /metrics deltas that histogram_sample
    keyed; parts that the server does not export, or that saw no request, are left out."""
    out = {}
    for part in PARTS:
        n = delta.get(f"ttft_n:{part}", 0.0)
        if n <= 0:
            continue
        prefix = f"ttft_b:{part}:"
        buckets = sorted((float(k[len(prefix):]), v) for k, v in delta.items() if k.startswith(prefix))
        stats: dict[str, float | int | None] = {}
        for q in (50, 99):
            v = quantile(buckets, q / 100)
            stats[f"p{q}"] = None if v is None else round(1000 * v, 3)
        stats["mean"] = round(1000 * delta.get(f"ttft_s:{part}", 0.0) / n, 3)
        stats["n"] = int(n)
        out[part] = stats
    return out


SERVER_COUNTERS = {
    "steps_blocked_on_adapters": "hotlora_steps_blocked_on_adapters_total",
    "adapter_loads": "hotlora_adapter_loads_total",
    "adapter_evictions": "hotlora_adapter_evictions_total",
    "eager_steps": "hotlora_eager_steps_total",
    "graph_steps": "hotlora_graph_steps_total",
    "prefix_cache_queries": "hotlora_prefix_cache_queries_total",
    "prefix_cache_hits": "hotlora_prefix_cache_hits_total",
    "preemptions": "hotlora_num_preemptions",
    "load_disk_to_cpu_s": 'vllm:lora_adapter_load_seconds_sum{transition="disk_to_cpu"}',
    "load_disk_to_cpu_n": 'vllm:lora_adapter_load_seconds_count{transition="disk_to_cpu"}',
    "load_cpu_to_gpu_s": 'vllm:lora_adapter_load_seconds_sum{transition="cpu_to_gpu"}',
    "load_cpu_to_gpu_n": 'vllm:lora_adapter_load_seconds_count{transition="cpu_to_gpu"}',
    **{f"gc{g}_{k[0]}": f'hotlora_gc_pause_seconds_{k}{{generation="{g}"}}' for g in "012" for k in ("sum", "count")},
}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
_PHASE = re.compile(r'^hotlora_step_phase_seconds_(sum|count)\{phase="([a-z_]+)"\}\s+(\S+)$')


def read_counters(url: str) -> dict[str, float]:
    """The SERVER_COUNTERS samples in /metrics (summed over their labels, unless the name gives them), the
    step timer's histograms as step_s:<phase> (sum of seconds), step_n:<phase> (count) and step_tokens, and the
    TTFT parts' histograms as ttft_* (histogram_sample); {} if it cannot be read."""
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    wanted = {v: k for k, v in SERVER_COUNTERS.items()}
    wanted["hotlora_step_tokens_sum"] = "step_tokens"
    out: dict[str, float] = {}
    for line in text.splitlines():
        phase = _PHASE.match(line)
        if phase:
            out[f"step_{'s' if phase[1] == 'sum' else 'n'}:{phase[2]}"] = float(phase[3])
            continue
        part = histogram_sample(line)
        if part:
            out[part[0]] = part[1]
            continue
        m = _SAMPLE.match(line)
        key = m and (wanted.get(m[1]) or wanted.get(m[1] + (m[2] or "")))
        if key:
            out[key] = out.get(key, 0.0) + float(m[3])
    return out


def step_profile(delta: dict[str, float]) -> dict:
    """Where the timed run's model steps spent their wall time, from the step timer's histogram deltas
    (server/engine/steptimer.py): mean ms per step by phase, each phase's share of the step wall time, and
    host_share, the share of everything but device_wait (the host sync on the step's results)."""
    seconds = {k.partition(":")[2]: v for k, v in delta.items() if k.startswith("step_s:")}
    steps = max((v for k, v in delta.items() if k.startswith("step_n:")), default=0.0)
    total = sum(seconds.values())
    if not steps or total <= 0:
        return {}
    return {
        "steps": int(steps), "step_ms": round(1000 * total / steps, 3),
        "step_tokens_mean": round(delta.get("step_tokens", 0.0) / steps, 2),
        "step_phases_ms": {p: round(1000 * v / steps, 3) for p, v in seconds.items()},
        "step_phase_share": {p: round(v / total, 4) for p, v in seconds.items()},
        "host_share": round(1 - seconds.get("device_wait", 0.0) / total, 4),
    }  # fmt: skip
