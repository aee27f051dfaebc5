"""An atomic on-disk adapter store: one PEFT folder per adapter name, safe against crashes and races.

Layout under root:
    <name> -> .hotlora~/versions/<name>@<id>   (relative symlink; the swap is one rename(2))
    .hotlora~/versions/<name>@<ns>-<id>/       immutable PEFT folders: current, previous, recently retired
    .hotlora~/tmp/<name>@<id>/                 uploads being staged and validated
    .hotlora~/locks/<name>.lock                flock per name: puts and deletes of one name serialize

'~' is outside the adapter-name alphabet, so the store's own entries never collide with a name.
A reader calls path(name), which resolves the link once: it gets an immutable folder, never a mix of
two uploads. A put is staged in tmp, fsync'd, validated, renamed into versions, then published by
renaming a fresh symlink over <name>. A failed put removes its staging folder; a crashed one is
removed at the next start. Folders dropped into root by hand are validated at start, like an upload,
and only then adopted as a version; a refused one stays where it is, unpublished, with its reason in
`refused` (at every start, so the refusal holds across restarts). Replaced versions are kept for a
grace time, at most max_retired per name; a name that holds nothing leaves no lock file behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hotlora.adapters.archive import UploadTooLarge, extract_archive, write_files
from hotlora.adapters.names import NAME_RE, name_error
from hotlora.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterError, LoraAdapter, load_peft_adapter

DEFAULT_MAX_BYTES = 4 << 30
_META = ".hotlora~"

__all__ = ["AdapterNotFound", "AdapterStore", "InvalidAdapterName", "StoredAdapter", "UploadTooLarge"]


class InvalidAdapterName(AdapterError):
    """A name outside [A-Za-z0-9._-]{1,64}, or "." / ".."."""


class AdapterNotFound(KeyError):
    def __str__(self) -> str:
        return f"adapter {self.args[0]!r} is not in the store"


def check_name(name: str) -> str:
    error = name_error(name)
    if error is not None:
        raise InvalidAdapterName(error)
    return name


@dataclass(slots=True)
class StoredAdapter:
    name: str
    path: Path  # the immutable version folder now published under `name`
    previous: Path | None  # the version it replaced; kept at least until the next put (for rollback)
    adapter: LoraAdapter  # as validated


def _created_ns(version: Path) -> int:
    stamp = version.name.rsplit("@", 1)[-1].split("-", 1)[0]
    return int(stamp) if stamp.isdigit() else 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_upload(staging: Path, name: str, fill: Callable[[Path], None],
                 check: Callable[[LoraAdapter], None] | None) -> LoraAdapter:
    """Write an upload into the empty folder `staging` and validate it as every store does: both files,
    a PEFT adapter that loads, `check` (compatibility with the base); fsync'd before it is published."""
    fill(staging)
    if not (staging / CONFIG_NAME).is_file() or not (staging / WEIGHTS_NAME).is_file():
        raise AdapterError(f"an adapter needs both {CONFIG_NAME} and {WEIGHTS_NAME}")
    adapter = load_peft_adapter(staging, name)
    if check is not None:
        check(adapter)
    _fsync_dir(staging)
    return adapter


class AdapterStore:
    def __init__(
        self,
        root: Path | str,
        check: Callable[[LoraAdapter], None] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        grace_s: float = 300.0,
        max_retired: int = 4,
    ) -> None:
        """check: extra validation of a loaded adapter (e.g. peft_format.check_compatible against the base).
        max_bytes: upload limit (decompressed). grace_s: how long a replaced version stays readable, for
        at most max_retired replaced versions per name."""
        self.root = Path(root).resolve()
        self.check = check
        self.max_bytes = max_bytes
        self.grace_s = grace_s
        self.max_retired = max_retired
        self._versions = self.root / _META / "versions"
        self._tmp = self.root / _META / "tmp"
        self._locks = self.root / _META / "locks"
        for d in (self._versions, self._tmp, self._locks):
            d.mkdir(parents=True, exist_ok=True)
        self.adopted: set[str] = set()  # hand-placed folders validated and taken in at this start
        self.refused: dict[str, str] = {}  # hand-placed folders that failed validation: name -> why
        self._clean_tmp()
        self._adopt_plain_folders()
        self._collect_orphans()

    # -- reading -----------------------------------------------------------------------------------
    def list(self) -> list[str]:
        """The names served: published, and not refused at start."""
        return sorted(n for n in os.listdir(self.root) if n != _META and n not in self.refused and self._published(n))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and self._published(name)

    def path(self, name: str) -> Path:
        """The folder holding `name` now; immutable for store-made versions."""
        check_name(name)
        link = self.root / name
        try:
            target = link.resolve(strict=True) if link.is_symlink() else link
        except (FileNotFoundError, RuntimeError):
            raise AdapterNotFound(name) from None
        if not (target / CONFIG_NAME).is_file():
            raise AdapterNotFound(name)
        return target

    # -- writing -----------------------------------------------------------------------------------
    def put_files(self, name: str, files: Mapping[str, BinaryIO]) -> StoredAdapter:
        """Loose files: adapter_config.json + adapter_model.safetensors (README.md allowed)."""
        return self._put(name, lambda dest: write_files(files, dest, self.max_bytes))

    def put_archive(self, name: str, archive: BinaryIO) -> StoredAdapter:
        """One .tar/.tar.gz/.zip (seekable) holding one PEFT folder, at its top or one level down."""
        return self._put(name, lambda dest: extract_archive(archive, dest, self.max_bytes))

    def put_folder(self, name: str, folder: Path) -> StoredAdapter:
        """Copy a local PEFT folder (its config and safetensors only)."""
        folder = Path(folder)
        with contextlib.ExitStack() as stack:
            files = {
                n: stack.enter_context(open(folder / n, "rb"))
                for n in (CONFIG_NAME, WEIGHTS_NAME)
                if (folder / n).is_file()
            }
            return self.put_files(name, files)

    def delete(self, name: str) -> None:
        check_name(name)
        with self._lock(name):
            link = self.root / name
            if not self._published(name):
                raise AdapterNotFound(name)
            if link.is_symlink():
                link.unlink()
            else:
                link.rename(self._versions / self._version_id(name))
            _fsync_dir(self.root)
            for version in self._versions_of(name):
                shutil.rmtree(version, ignore_errors=True)
            self.refused.pop(name, None)

    def restore(self, name: str, version: Path | None) -> None:
        """Publish an earlier version again (or remove the name if None): rollback after a failed register."""
        if version is None:
            with contextlib.suppress(AdapterNotFound):
                self.delete(name)
            return
        with self._lock(name):
            self._publish(name, Path(version))

    # -- internals ---------------------------------------------------------------------------------
    def _put(self, name: str, fill: Callable[[Path], None]) -> StoredAdapter:
        check_name(name)
        staging = self._tmp / self._version_id(name)
        with self._lock(name):
            staging.mkdir()
            try:
                adapter = stage_upload(staging, name, fill, self.check)
                version = self._versions / self._version_id(name)  # stamped under the lock: publish order
                staging.rename(version)
                _fsync_dir(self._versions)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            previous = self._current_version(name)
            self._publish(name, version)
            self.refused.pop(name, None)
            self._drop_versions(name, keep={version, previous})
        adapter.path = version
        return StoredAdapter(name=name, path=version, previous=previous, adapter=adapter)

    def _publish(self, name: str, version: Path) -> None:
        link = self.root / name
        if link.exists() and not link.is_symlink():  # a hand-placed folder: move it aside first
            link.rename(self._versions / self._version_id(name))
        tmp_link = self._tmp / f"{name}@link-{uuid.uuid4().hex}"
        os.symlink(os.path.relpath(version, self.root), tmp_link)
        os.replace(tmp_link, link)
        _fsync_dir(self.root)

    def _published(self, name: str) -> bool:
        link = self.root / name
        return name_error(name) is None and (link / CONFIG_NAME).is_file()

    def _current_version(self, name: str) -> Path | None:
        link = self.root / name
        if not link.is_symlink():
            return None
        target = link.resolve()
        return target if target.parent == self._versions else None

    def _versions_of(self, name: str) -> list[Path]:
        return [p for p in self._versions.iterdir() if p.name.rsplit("@", 1)[0] == name]

    def _drop_versions(self, name: str, keep: set[Path | None]) -> None:
        """Remove versions retired more than grace_s ago (a reader may still be loading a recent one), and
        all but the max_retired most recent ones whatever their age (fast re-uploads must not pile up).
        Called under the name's lock, so a newest version that is not kept was never published: a put
        that crashed between rename and publish, or one just rolled back."""
        versions = sorted(self._versions_of(name), key=_created_ns)
        now, kept = time.time_ns(), 0
        for i in reversed(range(len(versions))):
            version = versions[i]
            if version in keep:
                continue
            retired = _created_ns(versions[i + 1]) if i + 1 < len(versions) else 0
            if now - retired >= self.grace_s * 1e9 or kept >= self.max_retired:
                shutil.rmtree(version, ignore_errors=True)
            else:
                kept += 1

    @staticmethod
    def _version_id(name: str) -> str:
        return f"{name}@{time.time_ns()}-{uuid.uuid4().hex[:8]}"

    @contextlib.contextmanager
    def _lock(self, name: str, blocking: bool = True) -> Iterator[None]:
        """flock on locks/<name>.lock. A holder that leaves the name with nothing in the store unlinks the
        file, so every locker checks, once it holds the lock, that its file is still the one at the path."""
        path = self._locks / f"{name}.lock"
        while True:
            fh = open(path, "a+b")  # noqa: SIM115 (closed below)
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                with contextlib.suppress(FileNotFoundError):
                    if os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino:
                        break
            except BaseException:
                fh.close()
                raise
            fh.close()  # unlinked meanwhile by a holder: lock the file now at the path
        try:
            yield
        finally:
            if not self._holds(name):
                path.unlink(missing_ok=True)
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def _holds(self, name: str) -> bool:
        """Whether the store has anything of `name`: its entry in root, a version, or a staging folder."""
        link = self.root / name
        if link.exists() or link.is_symlink() or self._versions_of(name):
            return True
        return any(p.name.rsplit("@", 1)[0] == name for p in self._tmp.iterdir())

    def _clean_tmp(self) -> None:
        """Remove staging folders of puts that died; a live put (holding its name's lock) is left alone."""
        for entry in self._tmp.iterdir():
            name = entry.name.rsplit("@", 1)[0]
            if not NAME_RE.fullmatch(name):
                continue
            with contextlib.suppress(BlockingIOError), self._lock(name, blocking=False):
                if entry.is_symlink() or entry.is_file():
                    entry.unlink(missing_ok=True)
                else:
                    shutil.rmtree(entry, ignore_errors=True)

    def _adopt_plain_folders(self) -> None:
        """Validate each folder placed by hand as an upload would be; only a valid one becomes a version."""
        for name in self.list():
            link = self.root / name
            with self._lock(name):
                if not link.is_dir() or link.is_symlink():
                    continue
                try:
                    adapter = load_peft_adapter(link, name)
                    if self.check is not None:
                        self.check(adapter)
                except (AdapterError, OSError) as exc:
                    self.refused[name] = str(exc)
                    continue
                version = self._versions / self._version_id(name)
                link.rename(version)
                self._publish(name, version)
                self.adopted.add(name)

    def _collect_orphans(self) -> None:
        """Versions no name points at: crashed puts, and replaced ones whose grace time is over."""
        for name in {v.name.rsplit("@", 1)[0] for v in self._versions.iterdir()}:
            if NAME_RE.fullmatch(name):
                with contextlib.suppress(BlockingIOError), self._lock(name, blocking=False):
                    self._drop_versions(name, keep={self._current_version(name)})
