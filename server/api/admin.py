"""Admin routes (bearer token): upload (hot-swap), list, inspect, delete, load (pin) and unload adapters.

An upload is written through the AdapterStore (validated in a staging folder, then published
atomically) and registered with the engine in its thread, under one lock per name, so the very next
request sees it and concurrent uploads of one name apply in order. If registering fails, the store
is rolled back to what it held before.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any, BinaryIO

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from hotlora.adapters.archive import UploadTooLarge
from hotlora.adapters.peft_format import WEIGHTS_NAME, AdapterError
from hotlora.adapters.s3store import ConcurrentUpdate, StoreUnavailable
from hotlora.adapters.store import AdapterNotFound, InvalidAdapterName, StoredAdapter, check_name
from hotlora.server.api.auth import require_admin
from hotlora.server.api.errors import APIError, bad_request
from hotlora.server.api.state import AppState

log = logging.getLogger(__name__)
router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
ARCHIVE_TYPES = (
    "application/gzip",
    "application/x-gzip",
    "application/x-tar",
    "application/zip",
    "application/x-zip-compressed",
    "application/octet-stream",
)


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.hotlora
    state.require_ready()
    return state


def _name(state: AppState, name: str) -> str:
    try:
        check_name(name)
    except InvalidAdapterName as exc:
        raise bad_request(str(exc), param="name", code="invalid_name") from None
    return name


def _not_found(name: str) -> APIError:
    return APIError(404, f"adapter {name!r} does not exist", param="name", code="adapter_not_found")


def _info(a: Any) -> dict[str, Any]:
    return asdict(a) | {"object": "adapter"}


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise UploadTooLarge(f"the upload is larger than the limit of {limit} bytes")
        yield chunk


async def _read_upload(request: Request, limit: int, opened: list[Any]) -> tuple[dict[str, BinaryIO], BinaryIO | None]:
    """(loose files by name, or an archive): multipart form parts, or the raw body as an archive.
    Spooled files are appended to `opened` for the caller to close."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise UploadTooLarge(f"the upload ({declared} bytes) is larger than the limit of {limit} bytes")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        parser = MultiPartParser(request.headers, _limited(request, limit), max_files=8, max_fields=8)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise bad_request(f"malformed multipart upload: {exc.message}") from None
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        opened.extend(u.file for u in uploads)
        if not uploads:
            raise bad_request(
                "the upload holds no files: send adapter_config.json and adapter_model.safetensors, "
                "or one .tar.gz/.zip of a PEFT folder, as multipart file parts"
            )
        files = {(u.filename or "").rsplit("/", 1)[-1]: u.file for u in uploads}
        if len(uploads) == 1 and next(iter(files)).lower().endswith(ARCHIVE_SUFFIXES):
            return {}, uploads[0].file
        if len(files) != len(uploads):
            raise bad_request("two uploaded files have the same name")
        return files, None
    if ctype in ARCHIVE_TYPES:
        spool = tempfile.SpooledTemporaryFile(max_size=16 << 20)  # noqa: SIM115 (closed by the caller)
        opened.append(spool)
        async for chunk in _limited(request, limit):
            spool.write(chunk)
        spool.seek(0)
        return {}, spool
    raise APIError(
        415,
        "send multipart/form-data (adapter files or one archive), or an archive body with "
        "Content-Type application/gzip, application/zip or application/x-tar",
    )


def _unavailable(exc: StoreUnavailable) -> APIError:
    return APIError(503, str(exc), code="store_unavailable", headers={"Retry-After": "5"})


def _store_error(exc: Exception) -> APIError:
    if isinstance(exc, ConcurrentUpdate):
        return APIError(409, str(exc), param="name", code="concurrent_update")
    if isinstance(exc, UploadTooLarge):
        return APIError(413, str(exc), code="upload_too_large")
    if isinstance(exc, InvalidAdapterName):
        return bad_request(str(exc), param="name", code="invalid_name")
    return bad_request(f"invalid adapter: {exc}", code="invalid_adapter")


_BINARY = {"schema": {"type": "string", "format": "binary"}}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "The PEFT folder's files as multipart parts, or one .tar.gz/.tgz/.tar/.zip of it "
        "(a multipart part, or the raw body).",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "archive": {"type": "string", "format": "binary"},
                    },
                }
            },
            **{t: _BINARY for t in ("application/gzip", "application/zip", "application/x-tar")},
        },
    }
}


def _client_closed(state: AppState, name: str) -> APIError:
    """The client went away mid-upload: its doing, not the server's (logged at info, counted as 499)."""
    log.info("upload of adapter %r: the client closed the connection before the body was complete", name)
    state.metrics.uploads.labels("client_closed").inc()
    return APIError(499, "the client closed the connection during the upload", code="client_closed")


@router.post("/adapters/{name}", openapi_extra=UPLOAD_BODY)
async def upload_adapter(name: str, request: Request):
    state = _state(request)
    _name(state, name)
    if name in state.aliases:
        raise APIError(
            409, f"{name!r} is the base model's name; pick another adapter name", param="name", code="name_conflict"
        )
    opened: list[Any] = []
    try:
        files, archive = await _read_upload(request, state.upload_limit, opened)
        if archive is not None:
            stored = await publish(state, name, lambda: state.store.put_archive(name, archive))
        else:
            stored = await publish(state, name, lambda: state.store.put_files(name, files))
    except (AdapterError, UploadTooLarge) as exc:
        state.metrics.uploads.labels("refused").inc()
        raise _store_error(exc) from None
    except StoreUnavailable as exc:
        state.metrics.uploads.labels("store_unavailable").inc()
        raise _unavailable(exc) from None
    except ClientDisconnect:
        raise _client_closed(state, name) from None
    finally:
        for f in opened:
            f.close()
    state.metrics.uploads.labels("ok").inc()
    a = stored.adapter
    log.info(
        "adapter %r %s (r=%d, sha256 %s)",
        name,
        "replaced" if stored.previous else "added",
        a.config.rank,
        a.sha256[:12],
    )
    body = {
        "object": "adapter",
        "name": name,
        "rank": a.config.rank,
        "alpha": a.config.alpha,
        "target_modules": sorted(a.config.target_modules),
        "nbytes": (stored.path / WEIGHTS_NAME).stat().st_size,  # file bytes, as GET /admin/adapters says
        "sha256": a.sha256,
        "replaced": stored.previous is not None,
    }
    return JSONResponse(body, status_code=200 if stored.previous is not None else 201)


async def publish(state: AppState, name: str, put: Callable[[], StoredAdapter], replace: bool = True) -> StoredAdapter:
    """put() (a store write, in the thread pool), then the engine registers it, under the name's lock: the very next
    request sees it, and the store rolls back if registering fails. replace=False: a 400 if the name is taken."""
    async with state.lock(name):
        if not replace and (name in state.refused
                            or await state.engine.call(state.engine.engine.registry.__contains__, name)):
            raise bad_request(f"the adapter {name!r} is already loaded", param="lora_name", code="adapter_exists")
        stored = await run_in_threadpool(put)
        await _register(state, stored)
        state.refused.pop(name, None)
    return stored


async def _register(state: AppState, stored: StoredAdapter) -> None:
    registry = state.engine.engine.registry
    try:
        await state.engine.call(registry.register, stored.name, stored.path, stored.adapter)
    except BaseException:
        log.exception("registering %r failed; rolling the store back", stored.name)
        await run_in_threadpool(state.store.restore, stored.name, stored.previous)
        raise


@router.get("/adapters")
async def list_adapters(request: Request):
    state = _state(request)
    infos = await state.engine.call(state.engine.engine.registry.info)
    return {"object": "list", "data": [_info(a) for a in infos]}


@router.get("/adapters/{name}")
async def get_adapter(name: str, request: Request):
    state = _state(request)
    _name(state, name)
    await state.sync_adapter(name)
    infos = await state.engine.call(state.engine.engine.registry.info)
    for a in infos:
        if a.name == name:
            return _info(a)
    raise _not_found(name)


@router.delete("/adapters/{name}")
async def delete_adapter(name: str, request: Request):
    state = _state(request)
    _name(state, name)
    registry = state.engine.engine.registry
    async with state.lock(name):
        known = await state.engine.call(registry.__contains__, name)
        try:  # the store first: a store that cannot delete (503) leaves the adapter served as it was
            await run_in_threadpool(state.store.delete, name)
        except AdapterNotFound:
            if not known:
                raise _not_found(name) from None
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None
        if known:
            await state.engine.call(registry.remove, name)
    state.refused.pop(name, None)
    log.info("adapter %r deleted", name)
    return {"object": "adapter.deleted", "name": name, "deleted": True}


async def _pin(request: Request, name: str, pinned: bool) -> dict[str, Any]:
    state = _state(request)
    _name(state, name)
    registry = state.engine.engine.registry
    await state.sync_adapter(name)
    try:
        if pinned:  # the disk read happens off the engine thread; pin then only copies to the device
            pending = await state.engine.call(registry.prefetch, name)
            if pending is not None:
                await asyncio.wait([asyncio.wrap_future(pending)])
        await state.engine.call(registry.pin if pinned else registry.unpin, name)
    except KeyError:
        raise _not_found(name) from None
    except AdapterError as exc:
        raise APIError(409, str(exc), code="cannot_pin") from None
    infos = await state.engine.call(registry.info)
    return next((_info(a) for a in infos if a.name == name), {"name": name, "pinned": pinned})


@router.post("/adapters/{name}/load")
async def load_adapter(name: str, request: Request):
    return await _pin(request, name, True)


@router.post("/adapters/{name}/unload")
async def unload_adapter(name: str, request: Request):
    """Unpin, and free the device slot now if no running sequence uses it (else when the last one ends)."""
    state = _state(request)
    _name(state, name)
    registry = state.engine.engine.registry
    await state.sync_adapter(name)

    def unload() -> tuple[bool, Any]:  # one call on the engine thread: a DELETE cannot come in between
        freed = registry.unload(name)
        return freed, next(a for a in registry.info() if a.name == name)

    try:
        freed, info = await state.engine.call(unload)
    except KeyError:
        raise _not_found(name) from None
    return _info(info) | {"slot_freed": freed}
