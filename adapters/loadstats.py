"""Where adapter loads spend their time: per-phase samples and the two transition histograms.

Phases (seconds each, the last few thousand kept): disk_read (adapter_model.safetensors into one buffer,
pinned on CUDA), parse (its header; names, dtypes and shapes checked against the config and the base),
h2d_issue (host time to queue the device work, CUDA: on the engine thread, or the copy thread), h2d_copy
(the device work: one transfer of the file, the cast/transposed copies into the pool rows and the finiteness
check, timed with CUDA events; on CPU the same work itself), slot_tables (the slot-table writes on the engine thread).
Transitions (Prometheus histograms, vLLM's names): disk_to_cpu (disk_read + parse, on a worker thread),
cpu_to_gpu (from taking a slot to the slot being usable, as the engine thread sees it).
Recorded from several threads: deque.append is atomic, the histograms take a lock.
"""

from __future__ import annotations

import bisect
import statistics
import threading
from collections import deque
from dataclasses import dataclass, field

PHASES = ("disk_read", "parse", "h2d_issue", "h2d_copy", "slot_tables")
TRANSITIONS = ("disk_to_cpu", "cpu_to_gpu")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    """Cumulative-bucket histogram in Prometheus' shape (upper bounds, counts per bucket, sum)."""

    bounds: tuple[float, ...] = BUCKETS
    counts: list[int] = field(default_factory=list)  # one per bound, then +Inf (sized from bounds when empty)
    total: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.total += value

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        """([(upper bound as text, cumulative count)], sum): the +Inf bucket last."""
        with self.lock:
            out, running = [], 0
            for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
                running += n
                out.append((bound, running))
            return out, self.total

    @property
    def count(self) -> int:
        return sum(self.counts)


class LoadStats:
    def __init__(self, keep: int = 4096) -> None:
        self.phases: dict[str, deque[float]] = {p: deque(maxlen=keep) for p in PHASES}
        self.transitions = {t: Histogram() for t in TRANSITIONS}

    def record(self, phase: str, seconds: float) -> None:
        self.phases[phase].append(seconds)

    def observe(self, transition: str, seconds: float) -> None:
        self.transitions[transition].observe(seconds)

    def summary(self) -> dict[str, dict[str, float]]:
        """phase -> {n, p50_ms, max_ms} over the kept samples."""
        out = {}
        for phase, samples in self.phases.items():
            s = sorted(samples)  # one snapshot: other threads append meanwhile
            if s:  # the median of an even count is the mean of the middle two (not the upper one)
                out[phase] = {"n": len(s), "p50_ms": round(statistics.median(s) * 1000, 3),
                              "max_ms": round(s[-1] * 1000, 3)}
        return out
