"""An adapter store in S3-compatible object storage, shared by every replica, with a local disk cache.

The bucket side (pointers/<name> naming immutable versions/<name>/<id>/ objects, the pointer written last
by a conditional PUT, re-read by a conditional GET on its ETag) is adapters/s3protocol.py; this module is
the replica's side: uploads, the local cache of fetched versions, and what is served when the store is down.

An upload is staged and validated on local disk exactly as by the directory store (store.stage_upload),
its files are written as new objects under a fresh version id, and only then is the pointer written:
a reader that follows a pointer always finds a complete version, an upload that dies at any point leaves
the pointer as it was, and of two concurrent uploads of one name exactly one is published (the other gets
ConcurrentUpdate and removes its objects). Versions that no pointer names are removed after grace_s by later
uploads of the name, so a version a slow reader has just been pointed at stays readable.

Readers (replicas) fetch lazily: `sync(name, max_age)` re-reads the pointer with a conditional GET on its
ETag when the last check is older than max_age (the server passes its TTL, and 0 on a cold load), downloads
a version it has not cached into <cache>/versions/<name>@<id>/ (checked against the pointer's sizes and
sha256, renamed into place whole), and keeps the pointer it last saw in <cache>/pointers/<name>. If the
store cannot be reached, what is cached is served and StoreUnavailable is raised only for what is not.
Cached versions follow the directory store's bounds: current and previous kept, at most max_retired
replaced ones, each for grace_s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from hotlora.adapters.archive import extract_archive, write_files
from hotlora.adapters.peft_format import CONFIG_NAME, AdapterError, LoraAdapter
from hotlora.adapters.s3protocol import (
    FILES,
    ConcurrentUpdate,
    S3Objects,
    StoreUnavailable,
    Synced,
    default_client,
    new_version_id,
    parse_s3_url,
    sha256_file,
    version_ns,
)
from hotlora.adapters.store import DEFAULT_MAX_BYTES, AdapterNotFound, StoredAdapter, check_name, stage_upload

log = logging.getLogger(__name__)
# the protocol's names stay importable from here, where callers have always found them
__all__ = ["ConcurrentUpdate", "S3AdapterStore", "StoreUnavailable", "Synced", "default_client", "parse_s3_url"]


class S3AdapterStore:
    def __init__(self, url: str, cache_dir: Path | str, check: Callable[[LoraAdapter], None] | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, endpoint_url: str | None = None, client: Any = None,
                 grace_s: float = 300.0, max_retired: int = 4) -> None:
        """url: s3://bucket/prefix. cache_dir: this replica's cache (may be shared by replicas of one host).
        check, max_bytes: as for AdapterStore. client: a boto3 S3 client (default: from the environment)."""
        self.url = url
        self.remote = S3Objects(url, client, endpoint_url)
        self.check, self.max_bytes = check, max_bytes
        self.grace_s, self.max_retired = grace_s, max_retired
        self.root = Path(cache_dir).resolve()
        self._versions, self._tmp, self._pointers = (self.root / d for d in ("versions", "tmp", "pointers"))
        for d in (self._versions, self._tmp, self._pointers):
            d.mkdir(parents=True, exist_ok=True)
        self.refused: dict[str, str] = {}
        self.adopted: set[str] = set()
        self.fault: Callable[[str], None] | None = None  # called at each step of a put: fault injection in tests
        self.known: dict[str, Synced] = self._load_pointers()
        self._previous: dict[str, Synced | None] = {}  # per name, what its last put here replaced

    @property
    def s3(self) -> Any:
        return self.remote.s3

    @property
    def bucket(self) -> str:
        return self.remote.bucket

    @property
    def prefix(self) -> str:
        return self.remote.prefix

    def _local(self, name: str, version: str) -> Path:
        return self._versions / f"{name}@{version}"

    # -- reading -----------------------------------------------------------------------------------
    def list(self) -> list[str]:
        """Names with a pointer in the store; the names known here when the store cannot be reached."""
        try:
            return self.remote.list_names()
        except StoreUnavailable:
            log.warning("adapter store %s unreachable: listing the names known here", self.url)
            return sorted(self.known)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.known

    def path(self, name: str) -> Path:
        """The cached folder of `name`'s version as last synced (no store access)."""
        check_name(name)
        synced = self.known.get(name)
        if synced is None or not (self._local(name, synced.version) / CONFIG_NAME).is_file():
            raise AdapterNotFound(name)
        return self._local(name, synced.version)

    def is_fresh(self, name: str, max_age: float) -> bool:
        synced = self.known.get(name)
        return synced is not None and time.monotonic() - synced.checked < max_age

    def sync(self, name: str, max_age: float = 0.0) -> Path:
        """The local folder of `name`'s current version, checking the pointer if the last check is older
        than max_age. AdapterNotFound when the store has no such name; StoreUnavailable when the store
        cannot be reached and nothing is cached (with a cached version, that one is returned)."""
        check_name(name)
        synced = self.known.get(name)
        if synced is not None and time.monotonic() - synced.checked < max_age:
            return self.path(name)
        try:
            fresh = self.remote.get_pointer(name, synced.etag if synced is not None else None)
            if fresh is None:  # 304: unchanged (its version is fetched if a restore left it uncached)
                self._download(name, synced)
                synced.checked = time.monotonic()
            else:
                self._download(name, fresh)
                self._remember(name, fresh)
                self._drop_local(name)
        except AdapterNotFound:
            self._forget(name)
            raise
        except StoreUnavailable:
            if synced is None or not (self._local(name, synced.version) / CONFIG_NAME).is_file():
                raise
            log.warning("adapter store %s unreachable: serving the cached version of %r", self.url, name)
            synced.checked = time.monotonic()  # ask again after max_age, not on every request
        return self.path(name)

    def _download(self, name: str, synced: Synced) -> None:
        """Fetch a version not cached yet into tmp, check it against the pointer, rename it into place."""
        dest = self._local(name, synced.version)
        if (dest / CONFIG_NAME).is_file():
            return
        total = sum(f["size"] for f in synced.files.values())
        if total > self.max_bytes:
            raise AdapterError(f"adapter {name!r} in the store is {total} bytes, above the limit {self.max_bytes}")
        staging = self._tmp / f"{name}@{synced.version}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            self.remote.download_version(name, synced, staging)
            with contextlib.suppress(FileExistsError, OSError):
                staging.rename(dest)  # another process on this host may have put the same version first
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- writing -----------------------------------------------------------------------------------
    def put_files(self, name: str, files: Mapping[str, BinaryIO]) -> StoredAdapter:
        return self._put(name, lambda dest: write_files(files, dest, self.max_bytes))

    def put_archive(self, name: str, archive: BinaryIO) -> StoredAdapter:
        return self._put(name, lambda dest: extract_archive(archive, dest, self.max_bytes))

    def put_folder(self, name: str, folder: Path) -> StoredAdapter:
        with contextlib.ExitStack() as stack:
            folder = Path(folder)
            files = {n: stack.enter_context(open(folder / n, "rb")) for n in FILES if (folder / n).is_file()}
            return self.put_files(name, files)

    def _put(self, name: str, fill: Callable[[Path], None]) -> StoredAdapter:
        check_name(name)
        version = new_version_id()
        staging = self._tmp / f"{name}@{version}"
        staging.mkdir()
        try:
            adapter = stage_upload(staging, name, fill, self.check)
            previous = self.remote.current_or_none(name)  # the ETag the pointer swap is conditional on
            files = {f: {"size": (staging / f).stat().st_size, "sha256": sha256_file(staging / f)} for f in FILES}
            synced = Synced(version, "", files)
            try:
                self.remote.upload_version(name, staging, version, self._step)
                self._step("pointer")
            except BaseException:
                self.remote.delete_version(name, version)
                raise
            synced.etag = self.remote.swap_pointer(name, synced.body(), previous.etag if previous else None, version)
            synced.checked = time.monotonic()
            staging.rename(self._local(name, version))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._previous[name] = previous
        self._remember(name, synced)
        self._drop_local(name)
        self.remote.drop_versions(name, keep={version, previous.version if previous else ""}, grace_s=self.grace_s)
        path = self._local(name, version)
        adapter.path = path
        prev_path = self._local(name, previous.version) if previous is not None else None
        return StoredAdapter(name=name, path=path, previous=prev_path, adapter=adapter)

    def delete(self, name: str) -> None:
        check_name(name)
        current = self.remote.current_or_none(name)
        if current is None:
            self._forget(name)
            raise AdapterNotFound(name)
        self.remote.delete_pointer(name)
        self._forget(name)
        self.remote.drop_versions(name, keep=set(), grace_s=self.grace_s)

    def restore(self, name: str, version: Path | None) -> None:
        """Point `name` back at what it pointed at before this store's last put of it (None: delete it):
        rollback after a failed register. The previous version's objects are kept by that put."""
        previous = self._previous.pop(name, None)
        if version is None or previous is None:
            with contextlib.suppress(AdapterNotFound):
                self.delete(name)
            return
        current = self.remote.current_or_none(name)
        previous.etag = self.remote.swap_pointer(name, previous.body(), current.etag if current else None, "")
        previous.checked = 0.0  # downloaded on next use if not cached
        self._remember(name, previous)

    # -- bookkeeping -------------------------------------------------------------------------------
    def _step(self, what: str) -> None:
        if self.fault is not None:
            self.fault(what)

    def _remember(self, name: str, synced: Synced) -> None:
        self.known[name] = synced
        tmp = self._pointers / f".{name}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps({"version": synced.version, "etag": synced.etag, "files": synced.files}))
        os.replace(tmp, self._pointers / name)

    def _forget(self, name: str) -> None:
        self.known.pop(name, None)
        (self._pointers / name).unlink(missing_ok=True)

    def _load_pointers(self) -> dict[str, Synced]:
        """Pointers seen before a restart whose version is cached: served if the store is unreachable,
        and checked (checked=0) on first use otherwise."""
        known = {}
        for path in self._pointers.iterdir():
            with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
                doc = json.loads(path.read_text())
                if (self._local(path.name, doc["version"]) / CONFIG_NAME).is_file():
                    known[path.name] = Synced(doc["version"], doc["etag"], doc["files"], 0.0)
        return known

    def _drop_local(self, name: str) -> None:
        """Cached versions of `name`: keep the current one, and replaced ones for grace_s, max_retired at most."""
        current = self.known.get(name)
        versions = sorted(
            (p for p in self._versions.iterdir() if p.name.rsplit("@", 1)[0] == name),
            key=lambda p: version_ns(p.name.rsplit("@", 1)[1]),
        )
        now, kept = time.time_ns(), 0
        for i in reversed(range(len(versions) - 1)):
            path = versions[i]
            if current is not None and path.name == f"{name}@{current.version}":
                continue
            retired = version_ns(versions[i + 1].name.rsplit("@", 1)[1])
            if now - retired >= self.grace_s * 1e9 or kept >= self.max_retired:
                shutil.rmtree(path, ignore_errors=True)
            else:
                kept += 1
