"""hotlora behind Ray Serve: N replicas, adapter-affine routing by Ray Serve's model multiplexing.

Optional (`pip install hotlora[ray]`); the single-process server never imports this module.

- HotloraReplica: one hotlora server (the same FastAPI app as `hotlora serve`, on its own uvicorn) per
  replica, one GPU each (or the CPU). Its HTTP port stays open so that Prometheus scrapes each replica's
  /metrics; the ingress reaches it over loopback, which keeps streaming, errors and admin routes exactly
  as they are in the single-process server.
- HotloraIngress: the entry point (Ray Serve's HTTP proxy). It reads the model a request names (the
  `model` field of /v1 bodies, the name in /admin/adapters/<name>) and hands the request to a replica
  through a deployment handle with multiplexed_model_id = that name: Ray Serve prefers a replica that has
  the id loaded and keeps an LRU of ids per replica (sized like the replica's device adapter slots). Base
  model requests are keyed by the base model's name. `GET /-/replicas` lists the live replicas' metrics
  endpoints in Prometheus' HTTP service-discovery format.
- Adapters live in the shared S3-compatible store (--adapter-store s3://...): an upload through any replica
  is written there, and every replica learns of it through the store (adapters/s3store.py).
"""

# no `from __future__ import annotations`: Ray Serve's ingress hands FastAPI the methods' annotations,
# which must be real classes (a string "Request" would be read as a query parameter)
import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from hotlora.server.api import errors
from hotlora.server.api.errors import APIError
from hotlora.server.api.limits import too_large
from hotlora.server.api.state import ServerSettings
from hotlora.server.engine.config import DEVICE_DEFAULTS

log = logging.getLogger(__name__)
DIRECTORY = "hotlora-replicas"
NAMESPACE = "hotlora"
GENERATION_ROUTES = ("v1/completions", "v1/chat/completions")
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}


@ray.remote(num_cpus=0)
class ReplicaDirectory:
    """Where each replica says where its own HTTP server (and /metrics) listens; one per Ray namespace."""

    def __init__(self) -> None:
        self.replicas: dict[str, dict[str, Any]] = {}

    def register(self, replica_id: str, info: dict[str, Any]) -> None:
        # a replica now listening where another one was registered has replaced it (that one is dead: its
        # port was free); without this, the dead entry would look alive through the new server
        self.replicas = {rid: i for rid, i in self.replicas.items() if i["url"] != info["url"]}
        self.replicas[replica_id] = info

    def unregister(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)

    def list(self) -> dict[str, dict[str, Any]]:
        return dict(self.replicas)


def directory() -> Any:
    return ReplicaDirectory.options(
        name=DIRECTORY, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


def _bind(host: str, base: int) -> socket.socket:
    """A socket listening on the first free port from `base` (0: any free port), handed to uvicorn as it is,
    so that two replicas starting on one host cannot both pick the same port. It listens at once: with
    SO_REUSEADDR two sockets can both bind one port until one of them listens, and a replica that lost that
    race registered the winner's address (seen in a test run: one of two replicas never served)."""
    for port in range(base, base + 1000) if base else [0]:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(2048)
        except OSError:
            sock.close()
            continue
        return sock
    raise RuntimeError(f"no free port from {base} on {host}")


@serve.deployment
class HotloraReplica:
    def __init__(self, settings: ServerSettings, host: str = "0.0.0.0", port: int = 0,
                 switch_interval: float | None = None) -> None:
        import uvicorn

        from hotlora.server.api.app import create_app, uvicorn_config

        if switch_interval is not None:  # --gil-switch-interval: the replica's process, not the driver's
            sys.setswitchinterval(switch_interval)
        sock = _bind(host, port)
        self.port = sock.getsockname()[1]
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn_config(self.app))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="hotlora-uvicorn",
                                       daemon=True)
        self.thread.start()
        local = "127.0.0.1" if host in ("0.0.0.0", "127.0.0.1") else host
        self.client = httpx.AsyncClient(base_url=f"http://{local}:{self.port}", timeout=httpx.Timeout(None, connect=10))
        self._wait_ready()
        self._resident = self._multiplexer(settings.engine.max_loras)
        ctx = serve.get_replica_context()
        self.replica_id = getattr(ctx.replica_id, "unique_id", None) or str(ctx.replica_id)
        advertised = socket.gethostname() if host == "0.0.0.0" else host
        node = ray.get_runtime_context().get_node_id()
        info = {"url": f"http://{advertised}:{self.port}", "pid": os.getpid(), "node": node}
        ray.get(directory().register.remote(self.replica_id, info))

    def _wait_ready(self, timeout: float = 1800.0) -> None:
        """Block the constructor until the model is loaded and the server listens: Ray Serve routes to a
        replica once it is built."""
        state = self.app.state.hotlora
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if state.engine.error is not None:
                raise RuntimeError(f"the model failed to load: {state.engine.error}")
            if not self.thread.is_alive():
                raise RuntimeError("the replica's HTTP server stopped")
            if state.ready and self.server.started:
                return
            time.sleep(0.2)
        raise TimeoutError(f"the model did not load in {timeout} s")

    def _multiplexer(self, max_models: int) -> Any:
        """Ray Serve's record of the ids this replica serves, an LRU as large as its device adapter slots
        (so that Ray's view and hotlora's residency agree). Loading is a no-op here: the request itself
        syncs the adapter from the store and loads it."""

        async def resident(model_id: str) -> str:
            return model_id

        return serve.multiplexed(max_num_models_per_replica=max(1, max_models))(resident)

    async def forward(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
                      ) -> AsyncIterator[Any]:
        """Stream one HTTP exchange with this replica's server: first {"status", "headers"}, then body chunks."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._resident(model_id)
        request = self.client.build_request(method, f"/{path}", params=query or None, headers=headers, content=body)
        response = await self.client.send(request, stream=True)
        try:
            kept = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
            yield {"status": response.status_code, "headers": kept}
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()

    async def check_health(self) -> None:
        state = self.app.state.hotlora
        if not self.thread.is_alive() or state.engine.error is not None or state.engine.stopped.is_set():
            raise RuntimeError("the hotlora server of this replica is not running")

    def __del__(self) -> None:
        self.server.should_exit = True
        try:
            directory().unregister.remote(self.replica_id)
        except Exception:  # Ray may be shutting down already
            log.debug("could not unregister replica", exc_info=True)


ingress_app = FastAPI(title="hotlora (Ray Serve ingress)")
errors.install(ingress_app)  # its own errors in OpenAI's shape too


def routing_key(method: str, path: str, body: bytes) -> str:
    """The multiplexed model id of a request: the model of a generation, the adapter of an admin route."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["admin", "adapters"] and len(parts) >= 3:
        return parts[2]
    if method == "POST" and path.strip("/") in GENERATION_ROUTES:
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return ""  # the replica answers the malformed body
        return model if isinstance(model, str) else ""
    return ""


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The request's body, or None once it is known to pass `limit` bytes (from Content-Length, or as it arrives)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
@serve.ingress(ingress_app)
class HotloraIngress:
    def __init__(self, replica: Any, body_limit: int, upload_limit: int) -> None:
        self.replica = replica
        self.limits = {"body": (body_limit, "--max-body-bytes"), "upload": (upload_limit, "--max-upload-bytes")}

    @ingress_app.get("/-/replicas")
    async def replicas(self) -> JSONResponse:
        """Live replicas in Prometheus' HTTP service-discovery format (scrape each one's /metrics)."""
        entries = await directory().list.remote()

        async def alive(url: str) -> bool:
            try:
                async with httpx.AsyncClient(timeout=2) as client:
                    return (await client.get(url + "/health")).status_code == 200
            except httpx.HTTPError:
                return False

        up = await asyncio.gather(*(alive(e["url"]) for e in entries.values()))
        targets = [
            {"targets": [e["url"].split("://", 1)[1]], "labels": {"replica": rid, "pid": str(e["pid"]),
                                                                  "url": e["url"]}}
            for (rid, e), ok in zip(entries.items(), up, strict=True) if ok
        ]
        return JSONResponse(targets)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"])
    async def proxy(self, path: str, request: Request) -> Response:
        limit, flag = self.limits["upload" if path.startswith("admin/") else "body"]
        body = await _read_limited(request, limit)
        if body is None:  # answered here, before the whole body crosses to a replica (which would refuse it)
            return too_large(limit, flag).response()
        key = routing_key(request.method, path, body)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
        args = (request.method, path, request.url.query, headers, body)
        # a replica that died before it took the request: one retry elsewhere, for generations only
        attempts = 2 if path.strip("/") in GENERATION_ROUTES else 1
        for attempt in range(attempts):
            stream = self.replica.options(stream=True, multiplexed_model_id=key).forward.remote(*args)
            try:
                head = await stream.__anext__()
                break
            except ray.exceptions.RayActorError:
                if attempt + 1 == attempts:
                    return APIError(503, "the replica serving this request died", code="replica_died").response()
            except Exception as exc:  # e.g. the replica's forward failed (RayTaskError): not a bare text 500
                log.warning("a replica failed to answer %s /%s: %s", request.method, path, exc)
                return APIError(502, "the replica failed to answer", code="replica_error").response()

        async def rest() -> AsyncIterator[bytes]:
            async for chunk in stream:
                yield chunk

        return StreamingResponse(rest(), status_code=head["status"], headers=head["headers"])


def build_app(settings: ServerSettings, replicas: int = 1, cpus_per_replica: float = 1.0,
              gpus_per_replica: float = 0.0, host: str = "0.0.0.0", port: int = 0,
              max_ongoing_requests: int | None = None, gil_switch_interval: float | None = None) -> Any:
    """The Ray Serve application: the ingress in front of `replicas` hotlora replicas (each one's
    sys.setswitchinterval set to `gil_switch_interval` when given)."""
    if replicas > 1 and settings.adapter_store is None:
        raise ValueError("more than one replica needs a shared adapter store: --adapter-store s3://bucket/prefix")
    engine = settings.engine
    replica = HotloraReplica.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        # a replica is "overloaded" once its batch is full: then Ray routes past the replica that has the
        # adapter (or queues at the router when every replica is full) instead of piling up behind it
        max_ongoing_requests=max_ongoing_requests or engine.max_num_seqs
        or DEVICE_DEFAULTS["cuda" if gpus_per_replica else "cpu"][0],
        health_check_period_s=5,
    )
    return HotloraIngress.bind(replica.bind(settings, host, port, gil_switch_interval), settings.max_body_bytes,
                               settings.max_upload_bytes)


def app_builder(args: dict[str, str]) -> Any:
    """For `serve run hotlora.server.ray_serve:app_builder key=value ...` and Serve config files: the keys
    are `hotlora serve-ray`'s flags with underscores (model, adapter_store, replicas, ...)."""
    from hotlora.server.cli import build_parser
    from hotlora.server.cli_ray import ray_app_kwargs

    return build_app(**ray_app_kwargs(build_parser().parse_args(builder_argv(args))))


def builder_argv(args: dict[str, str]) -> list[str]:
    """`hotlora serve-ray` arguments from app_builder's key=value pairs: a switch (--x / --no-x, which takes no
    value) from the key's boolean value, every other key as --key VALUE."""
    from hotlora.server.cli import parse_bool, switch_dests

    argv, switches = ["serve-ray"], switch_dests()
    for key, value in args.items():
        flag = key.replace("_", "-")
        if flag.replace("-", "_") in switches:
            argv.append(f"--{flag}" if parse_bool(str(value)) else f"--no-{flag}")
        else:
            argv += [f"--{flag}", str(value)]
    return argv
