"""Long pure-Python loops on a reading thread that hand the GIL over as they go.

Python lets a thread that wants the GIL wait up to the switch interval (5 ms by default) before the holder is
made to drop it. Parsing an adapter's header and views is ~4 ms of pure Python per 84 MB file on the dev CPU
(~10 ms on a loaded server host), on a reading thread, while the engine thread wakes up for its next launch
(after the device sync, which released the GIL) and waits: that step's gap grows by up to the interval.
``yielding`` runs such a loop with a ``time.sleep(0)`` every few items, which gives the GIL to a waiting thread
at once (and costs ~1 us when none waits).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

EVERY = 32  # items between hand-overs: ~0.1-0.3 ms of a parse loop's work


def yielding(items: Iterable[T], every: int | None = None) -> Iterator[T]:
    """`items`, with the GIL offered to a waiting thread before every `every`-th one (default EVERY, read at
    each call) after the first."""
    every = every or EVERY
    for i, item in enumerate(items):
        if i and i % every == 0:
            time.sleep(0)
        yield item
