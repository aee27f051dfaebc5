"""An adapter store in S3-compatible object storage, shared by every replica, with a local disk cache.

Layout under s3://bucket/prefix:
    pointers/<name>                     JSON {"version": id, "files": {file: {"size", "sha256"}}}: what <name> is
    versions/<name>/<id>/<file>         immutable objects of one upload (adapter_config.json, adapter_model.safetensors)

An upload is staged and validated on local disk exactly as by the directory store (store.stage_upload),
its files are written as new objects under a fresh version id, and only then is the pointer written, by a
conditional PUT (If-Match the pointer's ETag seen before the upload, or If-None-Match '*' for a new name):
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
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hotlora.adapters.archive import extract_archive, write_files
from hotlora.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterError, LoraAdapter
from hotlora.adapters.store import DEFAULT_MAX_BYTES, AdapterNotFound, StoredAdapter, check_name, stage_upload

log = logging.getLogger(__name__)
FILES = (CONFIG_NAME, WEIGHTS_NAME)
__all__ = ["ConcurrentUpdate", "S3AdapterStore", "StoreUnavailable", "Synced", "parse_s3_url"]


class StoreUnavailable(RuntimeError):
    """The object store could not be reached (or answered 5xx), and nothing usable is cached."""


class ConcurrentUpdate(AdapterError):
    """Another upload or delete of the same name was published first."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix')."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise ValueError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


@dataclass(slots=True)
class Synced:
    """What a name points at as this replica last saw it."""

    version: str
    etag: str
    files: dict[str, dict[str, Any]]
    checked: float = 0.0  # time.monotonic() of the last answer from the store

    def body(self) -> bytes:
        return json.dumps({"version": self.version, "files": self.files}, sort_keys=True).encode()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _new_version_id() -> str:
    return f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"


def _version_ns(version: str) -> int:
    stamp = version.split("-", 1)[0]
    return int(stamp) if stamp.isdigit() else 0


def default_client(endpoint_url: str | None) -> Any:
    """A boto3 S3 client from the usual AWS environment (keys, region, profile); short connect timeouts and
    few retries, so that a replica that cannot reach the store answers from its cache quickly."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=2, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


class S3AdapterStore:
    def __init__(self, url: str, cache_dir: Path | str, check: Callable[[LoraAdapter], None] | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, endpoint_url: str | None = None, client: Any = None,
                 grace_s: float = 300.0, max_retired: int = 4) -> None:
        """url: s3://bucket/prefix. cache_dir: this replica's cache (may be shared by replicas of one host).
        check, max_bytes: as for AdapterStore. client: a boto3 S3 client (default: from the environment)."""
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.s3 = client if client is not None else default_client(endpoint_url)
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

    # -- keys --------------------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _local(self, name: str, version: str) -> Path:
        return self._versions / f"{name}@{version}"

    # -- reading -----------------------------------------------------------------------------------
    def list(self) -> list[str]:
        """Names with a pointer in the store; the names known here when the store cannot be reached."""
        names: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key("pointers", "")):
                names += [o["Key"].rsplit("/", 1)[-1] for o in page.get("Contents", [])]
        except Exception as exc:
            try:
                self._raise_if_unreachable(exc, "list")
            except StoreUnavailable:
                log.warning("adapter store %s unreachable: listing the names known here", self.url)
                return sorted(self.known)
            raise
        return sorted(names)

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
            fresh = self._get_pointer(name, synced.etag if synced is not None else None)
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

    def _get_pointer(self, name: str, etag: str | None) -> Synced | None:
        """The pointer as stored; None when it still has `etag` (a 304)."""
        kwargs = {"IfNoneMatch": etag} if etag else {}
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self._key("pointers", name), **kwargs)
            raw = obj["Body"].read()
        except Exception as exc:
            code = self._code(exc)
            if code in ("304", "NotModified"):
                return None
            if code in ("NoSuchKey", "404"):
                raise AdapterNotFound(name) from None
            self._raise_if_unreachable(exc, f"read the pointer of {name!r}")
            raise
        try:
            doc = json.loads(raw)
            files = {f: {"size": int(doc["files"][f]["size"]), "sha256": str(doc["files"][f]["sha256"])} for f in FILES}
            return Synced(str(doc["version"]), obj["ETag"], files, time.monotonic())
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterError(f"the store's pointer for {name!r} is malformed: {exc!r}") from None

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
            for fname, meta in synced.files.items():
                key = self._key("versions", name, synced.version, fname)
                try:
                    self.s3.download_file(self.bucket, key, str(staging / fname))
                except Exception as exc:
                    self._raise_if_unreachable(exc, f"download {key}")
                    raise AdapterError(f"adapter {name!r}: {key} could not be read from the store: {exc}") from None
                if (staging / fname).stat().st_size != meta["size"] or _sha256(staging / fname) != meta["sha256"]:
                    raise AdapterError(f"adapter {name!r}: {key} does not match its pointer (size or sha256)")
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
        version = _new_version_id()
        staging = self._tmp / f"{name}@{version}"
        staging.mkdir()
        try:
            adapter = stage_upload(staging, name, fill, self.check)
            previous = self._current_or_none(name)  # the ETag the pointer swap is conditional on
            files = {f: {"size": (staging / f).stat().st_size, "sha256": _sha256(staging / f)} for f in FILES}
            synced = Synced(version, "", files)
            try:
                self._upload_version(name, staging, version)
                self._step("pointer")
            except BaseException:
                self._delete_version(name, version)
                raise
            synced.etag = self._swap_pointer(name, synced.body(), previous.etag if previous else None, version)
            synced.checked = time.monotonic()
            staging.rename(self._local(name, version))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._previous[name] = previous
        self._remember(name, synced)
        self._drop_local(name)
        self._drop_remote(name, keep={version, previous.version if previous else ""})
        path = self._local(name, version)
        adapter.path = path
        prev_path = self._local(name, previous.version) if previous is not None else None
        return StoredAdapter(name=name, path=path, previous=prev_path, adapter=adapter)

    def _current_or_none(self, name: str) -> Synced | None:
        try:
            return self._get_pointer(name, None)
        except AdapterNotFound:
            return None

    def _upload_version(self, name: str, staging: Path, version: str) -> None:
        for fname in FILES:
            self._step(f"object:{fname}")
            key = self._key("versions", name, version, fname)
            try:
                with open(staging / fname, "rb") as body:
                    self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)
            except Exception as exc:
                self._raise_if_unreachable(exc, f"upload {key}")
                raise

    def _swap_pointer(self, name: str, body: bytes, expect_etag: str | None, version: str) -> str:
        cond = {"IfMatch": expect_etag} if expect_etag else {"IfNoneMatch": "*"}
        try:
            out = self.s3.put_object(
                Bucket=self.bucket, Key=self._key("pointers", name), Body=body,
                ContentType="application/json", **cond,
            )
        except Exception as exc:
            # only a refused swap surely left the pointer alone; after a lost answer the version may be
            # published, so its objects stay (and go with the grace-time cleanup if they were not)
            if self._code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                self._delete_version(name, version)
                raise ConcurrentUpdate(
                    f"adapter {name!r} was changed by another upload or delete meanwhile; this upload was not published"
                ) from None
            self._raise_if_unreachable(exc, f"publish {name!r}")
            raise
        return out["ETag"]

    def delete(self, name: str) -> None:
        check_name(name)
        current = self._current_or_none(name)
        if current is None:
            self._forget(name)
            raise AdapterNotFound(name)
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=self._key("pointers", name))
        except Exception as exc:
            self._raise_if_unreachable(exc, f"delete {name!r}")
            raise
        self._forget(name)
        self._drop_remote(name, keep=set())

    def restore(self, name: str, version: Path | None) -> None:
        """Point `name` back at what it pointed at before this store's last put of it (None: delete it):
        rollback after a failed register. The previous version's objects are kept by that put."""
        previous = self._previous.pop(name, None)
        if version is None or previous is None:
            with contextlib.suppress(AdapterNotFound):
                self.delete(name)
            return
        current = self._current_or_none(name)
        previous.etag = self._swap_pointer(name, previous.body(), current.etag if current else None, "")
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
            key=lambda p: _version_ns(p.name.rsplit("@", 1)[1]),
        )
        now, kept = time.time_ns(), 0
        for i in reversed(range(len(versions) - 1)):
            path = versions[i]
            if current is not None and path.name == f"{name}@{current.version}":
                continue
            retired = _version_ns(versions[i + 1].name.rsplit("@", 1)[1])
            if now - retired >= self.grace_s * 1e9 or kept >= self.max_retired:
                shutil.rmtree(path, ignore_errors=True)
            else:
                kept += 1

    def _drop_remote(self, name: str, keep: set[str]) -> None:
        """Remove version objects of `name` not in `keep` and older than grace_s (an upload in flight
        elsewhere, not yet published, is younger than that). Best effort: a failure leaves garbage only."""
        cutoff = time.time_ns() - int(self.grace_s * 1e9)
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key("versions", name, "")
            )
            stale = [
                {"Key": o["Key"]} for page in pages for o in page.get("Contents", [])
                if (v := o["Key"].rsplit("/", 2)[-2]) not in keep and _version_ns(v) < cutoff
            ]
            for i in range(0, len(stale), 1000):
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": stale[i : i + 1000], "Quiet": True})
        except Exception as exc:
            log.warning("could not remove old versions of %r from %s: %s", name, self.url, exc)

    def _delete_version(self, name: str, version: str) -> None:
        if not version:
            return
        keys = [{"Key": self._key("versions", name, version, f)} for f in FILES]
        with contextlib.suppress(Exception):
            self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    @staticmethod
    def _code(exc: Exception) -> str:
        response = getattr(exc, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def _raise_if_unreachable(self, exc: Exception, what: str) -> None:
        """Connection failures, timeouts and 5xx answers become StoreUnavailable; anything else is left."""
        from botocore.exceptions import BotoCoreError, ClientError

        status = 0
        if isinstance(exc, ClientError):
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if (isinstance(exc, BotoCoreError) and not isinstance(exc, ClientError)) or status >= 500:
            raise StoreUnavailable(f"the adapter store {self.url} could not be reached to {what}: {exc}") from exc
