"""POST /admin/adapters/{name}/export: the base model merged with an adapter or a mix, streamed as a .tar.

`name` is an adapter name or a mix ("sql*0.7+chat*0.3", validated as for serving: 404 naming an
unknown component, 400 for a malformed mix or a summed rank above --max-lora-rank). The merge
(server/model/merge.py, as `hotlora merge`) runs in a worker thread into a temporary folder in
`exports/` beside the adapter store (by default in the cache dir), one export at a time; the folder
is then streamed as an uncompressed tar (one folder entry, then each file, with a Content-Length)
and removed when the stream ends or is dropped (or the client left before it started).
"""

from __future__ import annotations

import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from hotlora.adapters.mixspec import is_mix
from hotlora.server.api.auth import require_admin
from hotlora.server.api.errors import APIError, bad_request
from hotlora.server.api.state import AppState

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
DTYPES = ("bfloat16", "float16", "float32")
_CHUNK = 1 << 20


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.hotlora
    state.require_ready()
    return state


async def _sources(state: AppState, name: str) -> tuple[list[Path], list[float] | None]:
    """The adapter folders (immutable store versions) and mix weights that `name` stands for now."""
    from hotlora.adapters.mixes import MixVersion  # torch: imported on first use, as the engine is

    registry = state.engine.engine.registry
    try:
        v = await state.engine.call(registry.resolve, name)
    except KeyError as exc:
        missing = getattr(exc, "name", name)
        why = "" if missing == name else f" (a component of the mix {name!r})"
        raise APIError(404, f"adapter {missing!r} does not exist{why}", param="name",
                       code="adapter_not_found") from None
    except ValueError as exc:
        raise bad_request(str(exc), param="name", code="invalid_mix" if is_mix(name) else "invalid_adapter") from None
    if isinstance(v, MixVersion):
        return [c.path for c in v.components], [c.weight for c in v.spec.components]
    return [v.path], None


def _tar_entries(folder: Path, arcname: str) -> list[tuple[bytes, Path | None]]:
    """(tar header, file or None for the folder entry) in order."""
    now = int(time.time())
    top = tarfile.TarInfo(arcname)
    top.type, top.mode, top.mtime = tarfile.DIRTYPE, 0o755, now
    entries: list[tuple[bytes, Path | None]] = [(top.tobuf(tarfile.PAX_FORMAT), None)]
    for f in sorted(folder.iterdir()):
        info = tarfile.TarInfo(f"{arcname}/{f.name}")
        info.size, info.mode, info.mtime = f.stat().st_size, 0o644, now
        entries.append((info.tobuf(tarfile.PAX_FORMAT), f))
    return entries


def _tar_stream(entries: list[tuple[bytes, Path | None]], cleanup: Path) -> Iterator[bytes]:
    try:
        for header, f in entries:
            yield header
            if f is None:
                continue
            size = 0
            with open(f, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    size += len(chunk)
                    yield chunk
            if size % 512:
                yield b"\0" * (512 - size % 512)
        yield b"\0" * 1024  # two zero blocks: the end of the archive
    finally:
        shutil.rmtree(cleanup, ignore_errors=True)


def _tar_size(entries: list[tuple[bytes, Path | None]]) -> int:
    files = sum(-(-f.stat().st_size // 512) * 512 for _, f in entries if f is not None)
    return sum(len(h) for h, _ in entries) + files + 1024


@router.post("/adapters/{name}/export")
async def export_adapter(name: str, request: Request, dtype: str | None = None):
    """The base merged with adapter (or mix) `name`, as a .tar of a Hugging Face model folder."""
    from hotlora.server.model.merge import base_dtype, load_plan, merge_to_folder

    state = _state(request)
    if dtype is not None and dtype not in DTYPES:
        raise bad_request(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", param="dtype")
    folders, weights = await _sources(state, name)
    ckpt = state.engine.engine.runner.checkpoint
    arcname = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{state.model_name}-{name}")[:200]
    work = state.adapter_dir.parent / "exports" / uuid.uuid4().hex
    try:
        async with state.export_lock:
            plan = await run_in_threadpool(load_plan, ckpt, folders, weights)
            out = work / arcname
            await run_in_threadpool(merge_to_folder, ckpt, plan, out, dtype or base_dtype(ckpt), False, False)
        entries = _tar_entries(out, arcname)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    headers = {"Content-Disposition": f'attachment; filename="{arcname}.tar"',
               "Content-Length": str(_tar_size(entries))}
    # also after the response: a client that left during the merge never starts the stream, whose `finally`
    # then never runs, and the merged model would stay on disk
    return StreamingResponse(_tar_stream(entries, work), media_type="application/x-tar", headers=headers,
                             background=BackgroundTask(shutil.rmtree, work, ignore_errors=True))
