"""The object-store side of the S3 adapter store: pointers and immutable versions in a bucket.

Layout under s3://bucket/prefix:
    pointers/<name>                     JSON {"version": id, "files": {file: {"size", "sha256"}}}: what <name> is
    versions/<name>/<id>/<file>         immutable objects of one upload (adapter_config.json, adapter_model.safetensors)

A version's objects are written first and its pointer last, by a conditional PUT (If-Match the ETag seen
before the upload, or If-None-Match '*' for a new name), so a reader that follows a pointer always finds a
complete version and of two concurrent publishers exactly one wins. Readers re-read a pointer with a
conditional GET on its ETag. Nothing here touches the local cache (adapters/s3store.py does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotlora.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from hotlora.adapters.store import AdapterNotFound

log = logging.getLogger(__name__)
FILES = (CONFIG_NAME, WEIGHTS_NAME)
_REFUSED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")  # a conditional write that lost


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def new_version_id() -> str:
    return f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"


def version_ns(version: str) -> int:
    """The creation time (ns) stamped at the head of a version id; 0 for an id without one."""
    stamp = version.split("-", 1)[0]
    return int(stamp) if stamp.isdigit() else 0


def default_client(endpoint_url: str | None) -> Any:
    """A boto3 S3 client from the usual AWS environment (keys, region, profile); short connect timeouts and
    few retries, so that a replica that cannot reach the store answers from its cache quickly."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=2, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


def error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3Objects:
    """The pointers and versions of one s3://bucket/prefix. Failures to reach the store (connection errors,
    timeouts, 5xx) are raised as StoreUnavailable; a missing pointer as AdapterNotFound."""

    def __init__(self, url: str, client: Any = None, endpoint_url: str | None = None) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)  # before building a client: a bad URL is a ValueError
        self.s3 = client if client is not None else default_client(endpoint_url)

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def list_names(self) -> list[str]:
        names: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.key("pointers", "")):
                names += [o["Key"].rsplit("/", 1)[-1] for o in page.get("Contents", [])]
        except Exception as exc:
            self.raise_if_unreachable(exc, "list")
            raise
        return sorted(names)

    def get_pointer(self, name: str, etag: str | None) -> Synced | None:
        """The pointer as stored; None when it still has `etag` (a 304)."""
        kwargs = {"IfNoneMatch": etag} if etag else {}
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self.key("pointers", name), **kwargs)
            raw = obj["Body"].read()
        except Exception as exc:
            code = error_code(exc)
            if code in ("304", "NotModified"):
                return None
            if code in ("NoSuchKey", "404"):
                raise AdapterNotFound(name) from None
            self.raise_if_unreachable(exc, f"read the pointer of {name!r}")
            raise
        try:
            doc = json.loads(raw)
            files = {f: {"size": int(doc["files"][f]["size"]), "sha256": str(doc["files"][f]["sha256"])} for f in FILES}
            return Synced(str(doc["version"]), obj["ETag"], files, time.monotonic())
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterError(f"the store's pointer for {name!r} is malformed: {exc!r}") from None

    def current_or_none(self, name: str) -> Synced | None:
        try:
            return self.get_pointer(name, None)
        except AdapterNotFound:
            return None

    def download_version(self, name: str, synced: Synced, dest: Path) -> None:
        """Download the files of `synced` into the folder `dest`, each checked against the pointer."""
        for fname, meta in synced.files.items():
            key = self.key("versions", name, synced.version, fname)
            try:
                self.s3.download_file(self.bucket, key, str(dest / fname))
            except Exception as exc:
                self.raise_if_unreachable(exc, f"download {key}")
                raise AdapterError(f"adapter {name!r}: {key} could not be read from the store: {exc}") from None
            if (dest / fname).stat().st_size != meta["size"] or sha256_file(dest / fname) != meta["sha256"]:
                raise AdapterError(f"adapter {name!r}: {key} does not match its pointer (size or sha256)")

    def upload_version(self, name: str, staging: Path, version: str, step: Callable[[str], None]) -> None:
        """Write the files of `staging` as the objects of `version`; step(what) is called before each."""
        for fname in FILES:
            step(f"object:{fname}")
            key = self.key("versions", name, version, fname)
            try:
                with open(staging / fname, "rb") as body:
                    self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)
            except Exception as exc:
                self.raise_if_unreachable(exc, f"upload {key}")
                raise

    def swap_pointer(self, name: str, body: bytes, expect_etag: str | None, version: str) -> str:
        """Publish `body` as the pointer of `name` if it still has `expect_etag` (None: if there is none);
        the new ETag. A lost race removes `version`'s objects and raises ConcurrentUpdate."""
        cond = {"IfMatch": expect_etag} if expect_etag else {"IfNoneMatch": "*"}
        try:
            out = self.s3.put_object(
                Bucket=self.bucket, Key=self.key("pointers", name), Body=body,
                ContentType="application/json", **cond,
            )
        except Exception as exc:
            # only a refused swap surely left the pointer alone; after a lost answer the version may be
            # published, so its objects stay (and go with the grace-time cleanup if they were not)
            if error_code(exc) in _REFUSED:
                self.delete_version(name, version)
                raise ConcurrentUpdate(
                    f"adapter {name!r} was changed by another upload or delete meanwhile; this upload was not published"
                ) from None
            self.raise_if_unreachable(exc, f"publish {name!r}")
            raise
        return out["ETag"]

    def delete_pointer(self, name: str) -> None:
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=self.key("pointers", name))
        except Exception as exc:
            self.raise_if_unreachable(exc, f"delete {name!r}")
            raise

    def drop_versions(self, name: str, keep: set[str], grace_s: float) -> None:
        """Remove version objects of `name` not in `keep` and older than grace_s (an upload in flight
        elsewhere, not yet published, is younger than that). Best effort: a failure leaves garbage only."""
        cutoff = time.time_ns() - int(grace_s * 1e9)
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.key("versions", name, "")
            )
            stale = [
                {"Key": o["Key"]} for page in pages for o in page.get("Contents", [])
                if (v := o["Key"].rsplit("/", 2)[-2]) not in keep and version_ns(v) < cutoff
            ]
            for i in range(0, len(stale), 1000):
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": stale[i : i + 1000], "Quiet": True})
        except Exception as exc:
            log.warning("could not remove old versions of %r from %s: %s", name, self.url, exc)

    def delete_version(self, name: str, version: str) -> None:
        if not version:
            return
        keys = [{"Key": self.key("versions", name, version, f)} for f in FILES]
        with contextlib.suppress(Exception):
            self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    def raise_if_unreachable(self, exc: Exception, what: str) -> None:
        """Connection failures, timeouts and 5xx answers become StoreUnavailable; anything else is left."""
        from botocore.exceptions import BotoCoreError, ClientError

        status = 0
        if isinstance(exc, ClientError):
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if (isinstance(exc, BotoCoreError) and not isinstance(exc, ClientError)) or status >= 500:
            raise StoreUnavailable(f"the adapter store {self.url} could not be reached to {what}: {exc}") from exc
