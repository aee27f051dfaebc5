"""A clean shutdown: the first SIGTERM (or Ctrl-C) drains instead of cutting streams.

Draining: /ready answers 503 and new work is refused with 503 at once; running requests may finish
within the grace period; those still open then end with an OpenAI-shaped error event (and [DONE]);
only then does uvicorn stop, and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType
from typing import Any

import uvicorn

from hotlora.server.api.state import AppState

log = logging.getLogger(__name__)
FLUSH_S = 5.0  # after the grace period: how long the ended streams get to send their error event


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState, grace_s: float) -> None:
        super().__init__(config)
        self.state, self.grace_s = state, grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Future | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining or self._loop is None:  # a second signal, or no loop yet: stop now
            super().handle_exit(sig, frame)
            return
        self.state.draining = True
        log.info("shutting down: draining %d open request(s), for %.0f s at most", self.state.engine.num_open,
                 self.grace_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        engine = self.state.engine
        deadline = time.monotonic() + self.grace_s
        while engine.num_open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ended = engine.end_all(f"the server is shutting down; the request did not finish in {self.grace_s:g} s")
        if ended:
            log.warning("shutdown: %d request(s) ended after the grace period", ended)
            deadline = time.monotonic() + FLUSH_S
            while engine.num_open and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self.should_exit = True
