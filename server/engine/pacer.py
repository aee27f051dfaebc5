"""LaunchPacer: how long the engine's driver may wait before it builds the next step (asynchronous scheduling).

With asynchronous scheduling (LLMEngine.step) step k + 1 is built and launched as soon as step k is, so a
request that arrives while step k runs on the device misses step k + 1 and waits for step k + 2: its time to
first token carries a whole extra step. The device, though, only needs step k + 1 once step k ends. So the
driver (AsyncEngine) may wait, taking new requests as they come, until the host time that building a step takes
before the in-flight step's end, and build the next step then: a request that arrives meanwhile is in it.

The pacer learns both times from the steps themselves, on the host's perf_counter clock:
- a decode step's device time, per bucket of its rows (rounded up to a power of two): a step starts on the
  device when it is submitted or when the step before it ends, whichever is later, and ends when the host's
  wait for its sampled ids returns. Only a wait that actually waited times the end exactly (a moving average).
  One that found the step done says the estimate may be too large, but not by how much: the host's own late
  wake is in that bound. So an estimate above it is dropped, the next step of the bucket runs unpaced, and its
  exact wait learns the time afresh (keeping the bound instead left the device idle for a dozen steps after
  one slow step, each bound only a margin below the last).
- the host time from the start of a step's build to its submission (schedule and prepare).

``delay`` is then start + device estimate - (HOST_FACTOR x host estimate + margin) - now, clamped to
[0, MAX_DELAY]; 0 with no estimate yet, so the engine behaves as without pacing until it has one.

Only decode steps are paced: their time follows from their rows (the weights' bytes, read once per step, and
the attention over contexts that grow a token a step). A step with prompt tokens varies with its chunks'
lengths and contexts far more than a bucket can tell: on the H200, pacing after such steps by their token
bucket oversold their time when 32 requests arrived at once (BENCHMARKS.md, twentieth session).
"""

from __future__ import annotations

from dataclasses import dataclass

ALPHA = 0.25  # weight of a new sample in the moving averages
WAITED = 5e-5  # a host wait longer than this (seconds) found the step still running: its end is exact
HOST_FACTOR = 1.5  # the next step's build may take longer than the average (newcomers' prompts, admissions)
MARGIN = 3e-4  # seconds, plus MARGIN_SHARE of the step's estimate: the device must not wait for the host
MARGIN_SHARE = 0.05
MAX_DELAY = 0.05  # never wait longer than this, whatever the estimates say


def bucket(tokens: int) -> int:
    """The estimate's key: the token count rounded up to a power of two."""
    return 1 << max(tokens - 1, 0).bit_length()


@dataclass(slots=True)
class _Step:
    handle: object  # the engine's Launched (compared by identity)
    key: int | None  # the bucket of a decode step; None for a step with prompt tokens (not timed, not paced)
    submitted: float
    start: float | None  # None while the step before it still runs


class LaunchPacer:
    def __init__(self) -> None:
        self.device: dict[int, float] = {}  # bucket -> seconds a step of it runs on the device
        self.host = 0.0  # seconds from the start of a step's build to its submission
        self._queue: list[_Step] = []  # launched and not yet completed, oldest first

    def built(self, seconds: float) -> None:
        """A step took `seconds` of host time from the start of its build to its submission."""
        self.host = seconds if not self.host else self.host + ALPHA * (seconds - self.host)

    def launched(self, handle: object, tokens: int, submitted: float, decode: bool) -> None:
        """A step of `tokens` tokens (`decode`: one for each of its sequences) was submitted at `submitted`."""
        start = submitted if not self._queue else None
        self._queue.append(_Step(handle, bucket(tokens) if decode else None, submitted, start))

    def completed(self, handle: object, wait_began: float, done: float) -> None:
        """The host's wait for `handle`'s results ran from `wait_began` to `done`."""
        index = next((i for i, s in enumerate(self._queue) if s.handle is handle), None)
        if index is None:
            return
        step = self._queue[index]
        del self._queue[: index + 1]  # and any older step that never completed (a failed step)
        if step.start is not None and step.key is not None:
            self._observe(step.key, done - step.start, exact=done - wait_began > WAITED)
        if self._queue and self._queue[0].start is None:
            self._queue[0].start = max(self._queue[0].submitted, done)

    def _observe(self, key: int, seconds: float, exact: bool) -> None:
        old = self.device.get(key)
        if old is None:
            if exact:
                self.device[key] = seconds
        elif exact:
            self.device[key] = old + ALPHA * (seconds - old)
        elif seconds < old:
            del self.device[key]

    def delay(self, handle: object, now: float) -> float:
        """Seconds the driver may wait before building the step after `handle` (the step in flight)."""
        if len(self._queue) != 1 or self._queue[0].handle is not handle or not self.host:
            return 0.0
        step = self._queue[0]
        device = self.device.get(step.key) if step.key is not None else None
        if device is None or step.start is None:
            return 0.0
        cushion = HOST_FACTOR * self.host + MARGIN + MARGIN_SHARE * device
        return min(max(step.start + device - cushion - now, 0.0), MAX_DELAY)
