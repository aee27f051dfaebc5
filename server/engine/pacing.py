"""Late scheduling: when to build the next step, so that requests arriving meanwhile still join it.

With asynchronous scheduling the host builds step N+1 while step N runs on the device. Built as soon as N has
the device, N+1 misses every request that arrives during N's run, and such a request waits a whole step more:
N+1 runs before the step that takes it. The engine's driver instead waits (taking commands: new requests,
aborts) until N is about to end, then builds N+1, early enough that its launch is queued before the device
runs dry.

    deadline = started(N) + min(device time of recent steps of N's size) - max(recent build times) - margin

Steps are sized by their token count rounded up to a power of two (the graphs' buckets); `history` steps of
each size are kept, and `history` build times (scheduling, preparation and launch on the host). A step shorter
than its size's recent ones, or a build slower than the recent ones, leaves the device idle for at most that
difference; with no history for a size there is no deadline (build at once).
"""

from __future__ import annotations

from collections import deque

MARGIN_S = 0.5e-3
HISTORY = 8
# A collect that waited less than this found the step already done: the device time it saw is the host's
# lateness, not the step's, and is not recorded.
MIN_WAIT_S = 50e-6


def size_of(tokens: int) -> int:
    """The size class of a step of `tokens` tokens."""
    return 1 << max(tokens - 1, 0).bit_length()


class StepPacer:
    def __init__(self, margin_s: float = MARGIN_S, history: int = HISTORY) -> None:
        self.margin_s = margin_s
        self.history = history
        self._device: dict[int, deque[float]] = {}
        self._build: deque[float] = deque(maxlen=history)

    def built(self, seconds: float) -> None:
        """A step took `seconds` of host time from scheduling to its queued launch."""
        self._build.append(seconds)

    def ran(self, tokens: int, seconds: float, waited: float) -> None:
        """A step of `tokens` tokens held the device `seconds`; its collect waited `waited` seconds for it."""
        if waited >= MIN_WAIT_S:
            self._device.setdefault(size_of(tokens), deque(maxlen=self.history)).append(seconds)

    def deadline(self, started: float, tokens: int) -> float | None:
        """When to start building the step after one of `tokens` tokens that got the device at `started`
        (time.monotonic()); None: at once."""
        times = self._device.get(size_of(tokens))
        if not times or not self._build:
            return None
        return started + min(times) - max(self._build) - self.margin_s
