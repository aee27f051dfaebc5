"""POST /admin/adapters/{name}/export: the base model merged with an adapter or a mix, streamed as a .tar.

`name` is an adapter name or a mix ("sql*0.7+chat*0.3", validated as for serving: 404 naming an
unknown component, 400 for a malformed mix or a summed rank above --max-lora-rank). The merge
(server/model/merge.py, as `hotlora merge`) runs in a worker thread into a temporary folder in
`exports/` beside the adapter store (by default in the cache dir), one export at a time; the folder
is then streamed as an uncompressed tar (one folder entry, then each file, with a Content-Length)
and removed when the stream ends or is dropped (or the client left before it started). A process that
dies meanwhile leaves its folder behind: each export first removes such folders (``sweep``), told from
exports in progress in any process sharing the folder by a lock the kernel drops with its holder (folders
from versions before that lock, which have none, once nothing in them has changed for a day).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from hotlora.adapters.mixspec import MixError, is_mix, parse_mix
from hotlora.adapters.names import NAME_RE
from hotlora.adapters.peft_config import AdapterError
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
    """The adapter folders (immutable store versions) and mix weights that `name` stands for now: with the shared
    store, each adapter named is first synced to the store's current version (as a request naming it would be)."""
    from hotlora.adapters.mixes import MixVersion  # torch: imported on first use, as the engine is

    registry = state.engine.engine.registry
    try:
        names = parse_mix(name).names if is_mix(name) else [name]
    except MixError as exc:
        raise bad_request(str(exc), param="name", code="invalid_mix") from None
    for n in names:
        if NAME_RE.fullmatch(n):
            await state.sync_adapter(n)  # a no-op for the local store
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


_LOCK = ".lock"


class WorkDir:
    """A fresh folder in `root` that this process holds: an exclusive flock on its `.lock` file from creation until
    close() removes the folder. It is made under a dot name (which sweep() skips) and renamed once locked, so no
    sweep sees it unlocked."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        staging = root / f".{name}"
        staging.mkdir()
        self._fd: int | None = os.open(staging / _LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.path = root / name
        staging.rename(self.path)
        self._closing = threading.Lock()  # the stream's end and the response's background task both close it

    def close(self) -> None:
        with self._closing:
            if self._fd is None:
                return
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._fd)  # the lock goes with the folder
            self._fd = None


UNLOCKED_MAX_AGE_S = 24 * 3600  # a folder with no lock file this old was left by a version before the locks


def sweep(root: Path, unlocked_max_age_s: float = UNLOCKED_MAX_AGE_S) -> list[Path]:
    """Remove the folders in `root` whose holder is gone (their lock is free), and those without a lock file
    (written by versions before the locks, which cannot say whether they are in progress) not modified for
    `unlocked_max_age_s`; the removed folders."""
    removed = []
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.name.startswith("."):
            continue
        try:
            fd = os.open(folder / _LOCK, os.O_RDWR)
        except FileNotFoundError:
            if _stale(folder, unlocked_max_age_s):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            continue
        except OSError:  # removed meanwhile, or not a folder
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # an export in progress
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


def _stale(folder: Path, max_age_s: float) -> bool:
    """`folder` is a folder that nothing under it has changed for max_age_s (False if it went meanwhile)."""
    try:
        newest = max(p.lstat().st_mtime for p in (folder, *folder.rglob("*")))
        return folder.is_dir() and time.time() - newest > max_age_s
    except OSError:
        return False


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


def _tar_stream(entries: list[tuple[bytes, Path | None]], work: WorkDir) -> Iterator[bytes]:
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
        work.close()


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
    await _sources(state, name)  # an unknown name or a bad mix is answered now, not after a running export
    ckpt = state.engine.engine.runner.checkpoint
    arcname = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{state.model_name}-{name}")[:200]
    root = state.adapter_dir.parent / "exports"
    await run_in_threadpool(sweep, root)
    work = await run_in_threadpool(WorkDir, root)
    try:
        async with state.export_lock:  # resolved again once the lock is held: a delete meanwhile is a 404, not a 500
            folders, weights = await _sources(state, name)
            try:
                plan = await run_in_threadpool(load_plan, ckpt, folders, weights)
            except (AdapterError, OSError) as exc:  # its version's folder went meanwhile (deleted, or replaced)
                raise APIError(409, f"adapter {name!r} changed during the export; retry: {exc}", param="name",
                               code="adapter_changed") from None
            out = work.path / arcname
            await run_in_threadpool(merge_to_folder, ckpt, plan, out, dtype or base_dtype(ckpt), False, False)
        entries = _tar_entries(out, arcname)
    except BaseException:
        work.close()
        raise
    headers = {"Content-Disposition": f'attachment; filename="{arcname}.tar"',
               "Content-Length": str(_tar_size(entries))}
    # also after the response: a client that left during the merge never starts the stream, whose `finally`
    # then never runs, and the merged model would stay on disk
    return StreamingResponse(_tar_stream(entries, work), media_type="application/x-tar", headers=headers,
                             background=BackgroundTask(work.close))
