"""The FastAPI app: OpenAI routes, admin routes, /health, /ready, /metrics.

The HTTP server comes up at once; the model loads in the engine thread meanwhile (/health answers
200, /ready 503 until the model is loaded and the adapter store registered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotlora.server.api import admin, errors, export, openai_routes, openapi, tokenize, vllm_lora
from hotlora.server.api.gcheap import thaw
from hotlora.server.api.limits import BodyLimit, http_protocol
from hotlora.server.api.state import AppState, ServerSettings

log = logging.getLogger(__name__)
# Idle keep-alive connections live longer on the server than in clients' pools (httpx and the openai
# client expire theirs after 5 s, uvicorn's own default): with equal timeouts a client may reuse a
# connection just as the server closes it, and that request fails with no response.
KEEP_ALIVE_S = 65.0
# the methods counted under their own name; any other token (h11 passes every one through) counts as OTHER, so
# that no client can add series to hotlora_http_requests at will
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def uvicorn_config(app: ASGIApp, log_level: str = "warning", graceful_s: float | None = None,
                   **listen: Any) -> Any:
    """The uvicorn settings every entry point shares (serve, the test harness, Ray Serve replicas)."""
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S, http=http_protocol(),
                          timeout_graceful_shutdown=graceful_s, **listen)


class HTTPMetrics:
    """Pure ASGI middleware (keeps streaming and disconnect detection intact): counts requests by route."""

    def __init__(self, app: ASGIApp, state: AppState, routes: Callable[[], list[Any]]) -> None:
        self.app, self.state, self.routes = app, state, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self.state.metrics.http.labels(method, self._route(scope), str(status[0])).inc()

    def _route(self, scope: Scope) -> str:
        """The matched route's path template (Starlette leaves the route in the scope), never the raw path."""
        route = scope.get("route")
        if route is None:  # answered before routing (a 413 from BodyLimit, a 404)
            for candidate in _flat(self.routes()):
                if candidate.matches(scope)[0] == Match.FULL:
                    route = candidate
                    break
        return getattr(route, "path", None) or "other"


def _flat(routes: list[Any]) -> list[Any]:
    """Routes with a path, descending into the routers that newer FastAPI versions keep as one entry."""
    flat = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        flat += _flat(inner.routes) if inner is not None else [route] if hasattr(route, "path") else []
    return flat


def create_app(settings: ServerSettings, engine_factory: Callable[[], Any] | None = None) -> FastAPI:
    """engine_factory builds the engine in its thread (default: LLMEngine(settings.engine))."""
    state = AppState(settings, engine_factory)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.metrics.gc_pauses.install()
        state.engine.start()
        watcher = asyncio.create_task(state.watch_startup())
        try:
            yield
        finally:
            watcher.cancel()
            await state.engine.shutdown()
            state.tokenizers.close()
            state.metrics.gc_pauses.remove()
            if state.gc_frozen:  # the stopped engine's objects are garbage now: let the collector see them
                thaw()

    app = FastAPI(title="hotlora", summary="OpenAI-compatible multi-LoRA server", lifespan=lifespan)
    app.state.hotlora = state
    errors.install(app)
    openapi.install(app)
    app.include_router(openai_routes.router)
    app.include_router(tokenize.router)
    app.include_router(admin.router)
    app.include_router(vllm_lora.router)
    app.include_router(export.router)
    _probes(app, state)
    app.add_middleware(BodyLimit, limit=lambda: settings.max_body_bytes)
    app.add_middleware(HTTPMetrics, state=state, routes=lambda: app.routes)
    return app


def _probes(app: FastAPI, state: AppState) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        """Alive (the model may still be loading)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """200 once the model is loaded and serving, else 503 with the reason."""
        if state.ready:
            return JSONResponse({"status": "ready", "model": state.model_name})
        reason = (
            "draining"
            if state.draining
            else f"failed: {state.engine.error}"
            if state.engine.error is not None
            else "stopped"
            if state.engine.stopped.is_set()
            else "loading"
        )
        return JSONResponse({"status": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics(_: Request) -> Response:
        stats, infos = None, []
        if state.ready:
            engine = state.engine.engine
            with contextlib.suppress(Exception):
                stats = await state.engine.call(engine.stats)
                infos = await state.engine.call(engine.registry.info)
        return Response(state.metrics.render(stats, infos, state.ready), media_type=CONTENT_TYPE_LATEST)
