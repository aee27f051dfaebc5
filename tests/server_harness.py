"""Run a real uvicorn server on loopback in a background thread, for the server tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import httpx
import uvicorn

from hotlora.server.api.app import create_app
from hotlora.server.api.state import ServerSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, settings: ServerSettings, engine_factory: Any = None) -> None:
        self.app = create_app(settings, engine_factory)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=5)
        )
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def state(self) -> Any:
        return self.app.state.hotlora

    @property
    def engine(self) -> Any:
        """The LLMEngine itself: only read it while no request is in flight, or through state.engine.call."""
        return self.state.engine.engine

    def call(self, fn: Any, *args: Any, timeout: float = 60.0) -> Any:
        """Run fn(*args) in the engine thread (between steps) from a test thread."""
        loop = self.state.engine._loop
        return asyncio.run_coroutine_threadsafe(self.state.engine.call(fn, *args), loop).result(timeout)

    def start(self, ready_timeout: float = 600.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.state.engine.error is not None:
                raise RuntimeError(f"engine failed: {self.state.engine.error}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
