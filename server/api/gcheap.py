"""The start-up heap frozen out of Python's cyclic garbage collector, and the collector's pauses measured.

Why: a collection of the oldest generation is stop-the-world (it holds the GIL) and walks every tracked object.
An engine process holds hundreds of thousands of them from start-up (the model's modules and parameters, the
tokenizer, the app): on the dev CPU, 481,000 objects with the default model, and a full collection took 420-450
ms; in that time neither the engine thread nor the event loop runs, so every stream's inter-token gap grows by as
much. Almost none of that heap ever becomes garbage. ``freeze_startup_heap`` (once the engine is ready) collects
once and moves what survives to the permanent generation (``gc.freeze``), so later collections walk only what
serving allocated since. vLLM (its API server, engine core and workers), Ray Serve replicas and TensorRT-LLM do the
same. ``thaw`` gives those objects back to the collector when the server stops (cycles among them, e.g. a stopped
engine's, are collectable again). The permanent generation is one per process, so with several servers in one
process (tests, a replica restarted in place) each freeze is counted and only the last server's thaw unfreezes:
an earlier one would hand a running server's heap back to the collector. ``--no-gc-freeze`` turns the freeze off.

``GcPauses`` times every collection from ``gc.callbacks`` into ``hotlora_gc_pause_seconds{generation}``.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_lock = threading.Lock()  # servers start and stop on different threads
_holders = 0  # freezes not yet thawed, one per server that froze


def freeze_startup_heap() -> tuple[int, float]:
    """Collect, then freeze every surviving tracked object; (objects frozen, seconds it took)."""
    global _holders
    t0 = time.perf_counter()
    gc.collect()  # outside the lock: finalizers run here
    with _lock:
        _holders += 1
        gc.freeze()
    return gc.get_freeze_count(), time.perf_counter() - t0


def thaw() -> None:
    """Release one freeze; the last one out (or a call with none held) moves the frozen objects back into the
    oldest generation (collectable again)."""
    global _holders
    with _lock:
        _holders = max(0, _holders - 1)
        if not _holders:
            gc.unfreeze()


class GcPauses:
    """The duration of each garbage collection, by generation, while installed (``install`` / ``remove``).

    Collections do not nest and run with the GIL held, so one start time is enough; the histogram's lock is
    taken only here, where no collection can start."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.seconds = Histogram("hotlora_gc_pause_seconds", "garbage collections (stop-the-world) by generation",
                                 ["generation"], buckets=_BUCKETS, registry=registry)
        self._children = [self.seconds.labels(str(g)) for g in range(3)]
        self._start: float | None = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:  # None: installed (by another thread) after this collection started
            self._children[info["generation"]].observe(time.perf_counter() - self._start)
            self._start = None

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
