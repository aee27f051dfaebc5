"""vLLM's runtime LoRA API, for clients written against it: POST /v1/load_lora_adapter {"lora_name", "lora_path"}
and POST /v1/unload_lora_adapter {"lora_name"}, answered with vLLM's plain-text lines.

Behind the admin token (vLLM asks for VLLM_ALLOW_RUNTIME_LORA_UPDATING), and lora_path must be a PEFT folder
inside one of --allowed-lora-paths (none: 403): the server reads files there, and nowhere else (hard links
aside). Loading copies the folder into the adapter store and registers it, as an upload does (hot: the next
request uses it); `load_inplace` replaces an adapter of that name, else a loaded name (here, in the shared store,
or refused at start) is a 400 as in vLLM. Unloading deletes it, as DELETE /admin/adapters does (the folder it came
from is left alone).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import BinaryIO

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import Field

from hotlora.adapters.archive import UploadTooLarge
from hotlora.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from hotlora.adapters.s3store import StoreUnavailable
from hotlora.adapters.store import StoredAdapter
from hotlora.server.api import admin
from hotlora.server.api.auth import require_admin
from hotlora.server.api.errors import APIError, bad_request
from hotlora.server.api.state import AppState
from hotlora.server.api.strict import Strict

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", dependencies=[Depends(require_admin)])
_ADMIN = {"security": [{"bearerAuth": []}]}  # /openapi.json marks the /admin routes by their prefix; these by hand


class LoadLoraAdapter(Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False


class UnloadLoraAdapter(Strict):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's; names identify adapters here


def _roots(state: AppState) -> list[Path]:
    roots = [r.resolve() for r in state.settings.allowed_lora_paths]
    if not roots:
        raise APIError(403, "loading adapters from server paths is off: start the server with --allowed-lora-paths "
                       "(or upload the adapter: POST /admin/adapters/{name})", param="lora_path",
                       code="lora_path_not_allowed")
    return roots


def _inside(real: Path, roots: list[Path], lora_path: str) -> None:
    if not any(real.is_relative_to(r) for r in roots):
        raise APIError(403, f"lora_path {lora_path!r} is outside --allowed-lora-paths", param="lora_path",
                       code="lora_path_not_allowed")


def _where(fd: int, fallback: Path) -> Path:
    """Where an open file really is (Linux: its /proc link, so a path swapped after the open does not fool the
    check); elsewhere the path resolved again."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return fallback.resolve()


def _open(path: Path | str, flags: int, dir_fd: int | None = None) -> int:
    try:
        return os.open(path, flags, dir_fd=dir_fd)
    except (OSError, ValueError) as exc:  # missing, not a folder, unreadable, a NUL byte...
        why = getattr(exc, "strerror", None) or str(exc)
        raise bad_request(f"cannot open {str(path)!r} on the server: {why}", param="lora_path") from None


def _put(state: AppState, name: str, roots: list[Path], lora_path: str) -> StoredAdapter:
    """The folder's config and weights into the store (in a worker thread). The folder and each file are checked
    where they really are once open, so that neither a symlink nor a path swapped meanwhile leads the server out
    of the allowed folders; symlinks within them are followed (a Hugging Face cache snapshot). A file that is not a
    regular one (a FIFO would wait for a writer forever) is refused."""
    try:
        _inside(Path(lora_path).resolve(), roots, lora_path)  # first: outside paths get 403, existing or not
    except (OSError, ValueError, RuntimeError):
        raise bad_request(f"lora_path {lora_path!r} is not a usable path", param="lora_path") from None
    with contextlib.ExitStack() as stack:
        folder = _open(lora_path, os.O_RDONLY | os.O_DIRECTORY)
        stack.callback(os.close, folder)
        where = _where(folder, Path(lora_path))
        _inside(where, roots, lora_path)
        files: dict[str, BinaryIO] = {}
        for n in (CONFIG_NAME, WEIGHTS_NAME):
            _inside((where / n).resolve(), roots, lora_path)  # no open of a file outside (a device has effects)
            try:
                fd = os.open(n, os.O_RDONLY | os.O_NONBLOCK, dir_fd=folder)
            except FileNotFoundError:
                continue  # the store names what is missing
            except OSError as exc:
                raise bad_request(f"cannot read {n} in lora_path: {exc.strerror}", param="lora_path") from None
            stack.callback(os.close, fd)
            _inside(_where(fd, Path(lora_path) / n), roots, lora_path)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise bad_request(f"{n} in lora_path is not a regular file", param="lora_path")
            files[n] = stack.enter_context(os.fdopen(os.dup(fd), "rb"))
        return state.store.put_files(name, files)


@router.post("/load_lora_adapter", response_class=PlainTextResponse, openapi_extra=_ADMIN)
async def load_lora_adapter(body: LoadLoraAdapter, request: Request):
    state = admin._state(request)
    name = admin._name(state, body.lora_name)
    if name in state.aliases:
        raise APIError(409, f"{name!r} is the base model's name", param="lora_name", code="name_conflict")
    roots = _roots(state)
    if not body.load_inplace:
        await state.sync_adapter(name)  # the shared store's adapters count as loaded, as /v1/models lists them
    try:
        await admin.publish(state, name, lambda: _put(state, name, roots, body.lora_path), replace=body.load_inplace)
    except (AdapterError, UploadTooLarge) as exc:
        raise admin._store_error(exc) from None
    except StoreUnavailable as exc:
        raise admin._unavailable(exc) from None
    log.info("adapter %r loaded from %s (POST /v1/load_lora_adapter)", name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/unload_lora_adapter", response_class=PlainTextResponse, openapi_extra=_ADMIN)
async def unload_lora_adapter(body: UnloadLoraAdapter, request: Request):
    await admin.delete_adapter(body.lora_name, request)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
