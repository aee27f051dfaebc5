"""vLLM's runtime LoRA API, for clients written against it: POST /v1/load_lora_adapter {"lora_name", "lora_path"}
and POST /v1/unload_lora_adapter {"lora_name"}, answered with vLLM's plain-text lines.

Behind the admin token (vLLM asks for VLLM_ALLOW_RUNTIME_LORA_UPDATING), and lora_path must be a PEFT folder
inside one of --allowed-lora-paths (none: 403): the server reads files there. Loading copies the folder into the
adapter store and registers it, as an upload does (hot: the next request uses it); `load_inplace` replaces an
adapter of that name, else a loaded name is a 400 as in vLLM. Unloading deletes it, as DELETE /admin/adapters does
(the folder it came from is left alone).
"""

from __future__ import annotations

import contextlib
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

router = APIRouter(prefix="/v1", dependencies=[Depends(require_admin)])
_ADMIN = {"security": [{"bearerAuth": []}]}  # /openapi.json marks the /admin routes by their prefix; these by hand


class LoadLoraAdapter(Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False


class UnloadLoraAdapter(Strict):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's; names identify adapters here


def _folder(state: AppState, lora_path: str) -> Path:
    """lora_path, resolved (no symlink left in it), if it is a folder inside an allowed one; else a 4xx."""
    roots = [r.resolve() for r in state.settings.allowed_lora_paths]
    if not roots:
        raise APIError(403, "loading adapters from server paths is off: start the server with --allowed-lora-paths "
                       "(or upload the adapter: POST /admin/adapters/{name})", param="lora_path",
                       code="lora_path_not_allowed")
    try:
        folder = Path(lora_path).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, unreadable, a symlink loop
        raise bad_request(f"lora_path {lora_path!r} does not exist on the server", param="lora_path") from None
    if not any(folder.is_relative_to(r) for r in roots):
        raise APIError(403, f"lora_path {lora_path!r} is outside --allowed-lora-paths", param="lora_path",
                       code="lora_path_not_allowed")
    if not folder.is_dir():
        raise bad_request(f"lora_path {lora_path!r} is not a folder (a PEFT adapter's)", param="lora_path")
    return folder


def _put(state: AppState, name: str, folder: Path) -> StoredAdapter:
    """The folder's config and weights into the store, each opened without following a symlink (so that a link
    inside an allowed folder cannot point the server at a file elsewhere)."""
    with contextlib.ExitStack() as stack:
        files: dict[str, BinaryIO] = {}
        for n in (CONFIG_NAME, WEIGHTS_NAME):
            try:  # O_NONBLOCK: a FIFO named like the weights must not hold a worker until someone writes to it
                fd = os.open(folder / n, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except FileNotFoundError:
                continue  # the store names what is missing
            except OSError as exc:  # a symlink (ELOOP), or unreadable
                raise bad_request(f"cannot read {n} in lora_path: {exc.strerror}", param="lora_path") from None
            f = stack.enter_context(os.fdopen(fd, "rb"))
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise bad_request(f"{n} in lora_path is not a regular file", param="lora_path")
            files[n] = f
        return state.store.put_files(name, files)


@router.post("/load_lora_adapter", response_class=PlainTextResponse, openapi_extra=_ADMIN)
async def load_lora_adapter(body: LoadLoraAdapter, request: Request):
    state = admin._state(request)
    name = admin._name(state, body.lora_name)
    if name in state.aliases:
        raise APIError(409, f"{name!r} is the base model's name", param="lora_name", code="name_conflict")
    folder = _folder(state, body.lora_path)
    try:
        await admin.publish(state, name, lambda: _put(state, name, folder), replace=body.load_inplace)
    except (AdapterError, UploadTooLarge) as exc:
        raise admin._store_error(exc) from None
    except StoreUnavailable as exc:
        raise admin._unavailable(exc) from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/unload_lora_adapter", response_class=PlainTextResponse, openapi_extra=_ADMIN)
async def unload_lora_adapter(body: UnloadLoraAdapter, request: Request):
    await admin.delete_adapter(body.lora_name, request)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
