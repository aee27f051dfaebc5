"""The servers of bench/http_overhead.py, each run as `python bench/http_stamps.py {hotlora|bare} PORT`, with the
hooks that stamp a request's boundaries on time.monotonic().

The hooks wrap functions from the outside (a protocol subclass, an ASGI wrapper, module and class attributes
replaced in this process only): the server's own code takes no stamps. Requests are sequential, so the record of
the request in flight is one global that every hook (the engine thread's too) writes into. GET /_bench/stamps
returns the finished records and forgets them.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

RECORDS: list[dict[str, Any]] = []
CURRENT: list[dict[str, Any]] = [{}]
_TOKEN = re.compile(rb'"(?:text|content)":"[^"]')  # a chunk with generated text (not chat's empty role chunk)


def stamp(key: str) -> None:
    rec = CURRENT[0]
    if key not in rec:
        rec[key] = time.monotonic()


def stamped_protocol(base: type) -> type:
    class Stamped(base):
        def on_message_begin(self) -> None:
            CURRENT[0] = {"recv": time.monotonic()}
            RECORDS.append(CURRENT[0])
            super().on_message_begin()

        def on_message_complete(self) -> None:
            stamp("body_in")
            super().on_message_complete()

    return Stamped


class StampedApp:
    """The outermost ASGI app: stamps `asgi` and `sent` (the first chunk with generated text written)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rec = CURRENT[0]
        if scope["path"] == "/_bench/stamps":
            done = [r for r in RECORDS if r is not rec]
            RECORDS[:] = [rec]
            await _answer(send, 200, json.dumps(done).encode(), b"application/json")
            return
        rec["path"] = scope["path"]
        rec["asgi"] = time.monotonic()

        async def stamped_send(message: dict) -> None:
            await send(message)
            if message["type"] == "http.response.body" and "sent" not in rec and _TOKEN.search(message["body"]):
                rec["sent"] = time.monotonic()

        await self.app(scope, receive, stamped_send)


async def _answer(send: Any, status: int, body: bytes, ctype: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
    await send({"type": "http.response.body", "body": body})


async def bare(scope: dict, receive: Any, send: Any) -> None:
    """The floor: drain the body, answer one SSE chunk, [DONE], end (as StreamingResponse sends them)."""
    if scope["path"] == "/bare-ready":
        await _answer(send, 200, b"ok", b"text/plain")
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
    chunk = b'data: {"id":"x","object":"text_completion","choices":[{"index":0,"text":" w1","finish_reason":"length"}]}'
    await send({"type": "http.response.body", "body": chunk + b"\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def hook_hotlora() -> None:
    """Stamps inside hotlora: the routes' apps, the handlers' first call, the engine hand-off, the phases."""
    from hotlora.server.api import metrics, openai_routes
    from hotlora.server.engine.async_engine import AsyncEngine

    _hook_request()
    state_of = openai_routes._state

    def _state(request: Any) -> Any:
        stamp("handler")
        return state_of(request)

    openai_routes._state = _state
    add_all, add_unless = AsyncEngine.add_all, AsyncEngine._add_unless_failed

    async def stamped_add_all(self: Any, requests: list) -> list:
        stamp("add")
        streams = await add_all(self, requests)
        stamp("added")
        return streams

    def stamped_add_unless(engine: Any, requests: list, streams: list) -> None:
        stamp("eng_add")
        add_unless(engine, requests, streams)

    AsyncEngine.add_all, AsyncEngine._add_unless_failed = stamped_add_all, staticmethod(stamped_add_unless)
    observe = metrics.RequestPhaseHistograms.observe

    def stamped_observe(self: Any, t: Any, first_seen: float) -> None:
        rec = CURRENT[0]
        rec.update(queued=t.queued, scheduled=t.scheduled, first_token=t.first_token, seen=first_seen)
        observe(self, t, first_seen)

    metrics.RequestPhaseHistograms.observe = stamped_observe


def _hook_request() -> None:
    """FastAPI's route app builds its Request first thing (fastapi.routing.request_response), then reads the body
    and parses its JSON through it."""
    import fastapi.routing

    class StampedRequest(fastapi.routing.Request):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            stamp("route")
            super().__init__(*args, **kwargs)

        async def body(self) -> bytes:
            body = await super().body()
            stamp("body_read")
            return body

        async def json(self) -> Any:
            data = await super().json()
            stamp("json")
            return data

    fastapi.routing.Request = StampedRequest


def serve_hotlora(port: int) -> None:
    import uvicorn

    from hotlora.server.api.app import create_app, uvicorn_config
    from hotlora.server.api.state import ServerSettings
    from hotlora.server.engine.config import EngineConfig

    engine = EngineConfig(model="random:tiny", quant="none", device="cpu", kv_cache_memory=0.25, max_model_len=2048)
    app = create_app(ServerSettings(engine, served_model_name="m"))
    hook_hotlora()
    config = uvicorn_config(StampedApp(app), host="127.0.0.1", port=port)
    config.http = stamped_protocol(config.http)
    uvicorn.Server(config).run()


def serve_bare(port: int) -> None:
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    config = uvicorn.Config(StampedApp(bare), host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            http=stamped_protocol(HttpToolsProtocol))
    uvicorn.Server(config).run()


def main() -> None:
    serve = {"hotlora": serve_hotlora, "bare": serve_bare}[sys.argv[1]]
    profile = os.environ.get("HTTP_STAMPS_PROFILE")  # a file: cProfile of the event loop's thread, written at exit
    if not profile:
        serve(int(sys.argv[2]))
        return
    import cProfile
    import signal

    prof = cProfile.Profile()

    def dump(*_: Any) -> None:  # uvicorn re-raises the SIGTERM it caught once it has shut down
        prof.disable()
        prof.dump_stats(f"{profile}.{sys.argv[1]}")
        sys.exit(0)

    signal.signal(signal.SIGTERM, dump)
    prof.enable()
    serve(int(sys.argv[2]))


if __name__ == "__main__":
    main()
