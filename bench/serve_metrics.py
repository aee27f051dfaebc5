"""Where the time to first token went, for bench/serve.py: the server's request-phase histograms on /metrics,
as deltas over the timed run.

TTFT on the server = queue + prefill + delivery, per request (server/api/metrics.py):

- queue: vllm:request_queue_time_seconds, from the API handing the request to the engine to the first step
  that computes any of its prompt (waiting for a batch slot, KV blocks or its adapter's load);
- prefill: vllm:request_prefill_time_seconds, from there to its first output token on the engine's host;
- delivery: hotlora_request_first_token_delivery_seconds, from there to the API holding that token.

Percentiles come from the bucket counts, interpolated linearly inside the bucket that holds the rank (as
Prometheus' histogram_quantile does; a rank in the +Inf bucket reads as the largest finite bound), so they are
only as fine as the buckets: about 10-25% of the value below a second. Means are exact (sum / count). The parts'
means add up to the server's mean TTFT; their percentiles do not add up.
"""

from __future__ import annotations

import math
import re

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
