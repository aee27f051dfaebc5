"""Safe unpacking of an uploaded adapter: loose files, or one .tar(.gz) / .zip of a PEFT folder.

Only adapter_config.json, adapter_model.safetensors and README.md are written; pickles anywhere in
the upload are refused; absolute paths, "..", links and special files are refused; every byte written
is counted against a limit (archive headers are not trusted for sizes, but a header that declares too
much is refused before anything is unpacked). Past RATIO_FLOOR bytes written, an archive that has
unpacked to more than MAX_RATIO times the compressed bytes read is refused as a bomb, while streaming.
"""

from __future__ import annotations

import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from hotlora.adapters.peft_format import CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, AdapterError

ALLOWED_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md")
MAX_MEMBERS = 4096
MAX_SMALL_FILE_BYTES = 1 << 20  # adapter_config.json and README.md
MAX_RATIO = 50  # float weights compress ~1.1x, and an untrained adapter (B = 0) about 2x
RATIO_FLOOR = 16 << 20
_CHUNK = 1 << 20


class UploadTooLarge(AdapterError):
    """The upload (or what it decompresses to) is above the configured limit."""


class _Budget:
    """Bytes written against a limit; `compressed()` (when given) says how many archive bytes were read."""

    def __init__(self, limit: int, compressed: Callable[[], int] | None = None) -> None:
        self.left = limit
        self.limit = limit
        self.compressed = compressed

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise UploadTooLarge(
                f"the adapter unpacks to more than {self.limit} bytes, the most an adapter of the largest "
                "allowed rank can be for this base (or the upload limit)"
            )
        written = self.limit - self.left
        if self.compressed is not None and written > RATIO_FLOOR and written > MAX_RATIO * max(self.compressed(), 1):
            raise UploadTooLarge(
                f"the archive unpacks to more than {MAX_RATIO} times its compressed size; refused as a bomb"
            )

    def declare(self, name: str, size: int) -> None:
        """A member's declared size, checked before it is unpacked."""
        limit = self.limit if PurePosixPath(name).name == WEIGHTS_NAME else MAX_SMALL_FILE_BYTES
        if size > limit:
            raise UploadTooLarge(f"archive member {name!r} declares {size} bytes; at most {limit} are accepted")


def _refuse_pickle(name: str) -> None:
    if PurePosixPath(name).suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterError(f"{name}: pickled files (.bin/.pt/...) are refused; upload {WEIGHTS_NAME} instead")


def write_stream(src: BinaryIO, dest: Path, budget: _Budget) -> None:
    """Copy src into a new file at dest, counting bytes against budget, then fsync it."""
    with open(dest, "xb") as out:
        while chunk := src.read(_CHUNK):
            budget.take(len(chunk))
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def write_files(files: Mapping[str, BinaryIO], dest: Path, max_bytes: int) -> None:
    """Loose uploaded files, keyed by their file name."""
    budget = _Budget(max_bytes)
    for name, src in files.items():
        _refuse_pickle(name)
        if name not in ALLOWED_FILES:
            raise AdapterError(f"unexpected file {name!r}: upload {CONFIG_NAME} and {WEIGHTS_NAME}")
        write_stream(src, dest / name, budget if name == WEIGHTS_NAME else _Budget(MAX_SMALL_FILE_BYTES))


def _member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise AdapterError(f"archive member {name!r} has an absolute or parent-relative path")
    return PurePosixPath(*[p for p in path.parts if p != "."])


def _pick(paths: list[PurePosixPath]) -> PurePosixPath:
    """The one folder of the archive that holds adapter_config.json."""
    folders = {p.parent for p in paths if p.name == CONFIG_NAME}
    if len(folders) != 1:
        what = "no" if not folders else "more than one"
        raise AdapterError(f"the archive holds {what} {CONFIG_NAME}; it must hold exactly one PEFT folder")
    return folders.pop()


def _wanted(path: PurePosixPath, folder: PurePosixPath) -> bool:
    return path.parent == folder and path.name in ALLOWED_FILES


def _check_ratio(unpacked: int, packed: int) -> None:
    if unpacked > RATIO_FLOOR and unpacked > MAX_RATIO * max(packed, 1):
        raise UploadTooLarge(
            f"the archive declares {unpacked} bytes in {packed} compressed bytes, more than {MAX_RATIO} times "
            "its size; refused as a bomb"
        )


def _extract_tar(src: BinaryIO, dest: Path, budget: _Budget) -> None:
    packed = src.seek(0, os.SEEK_END)
    src.seek(0)
    try:
        with tarfile.open(fileobj=src, mode="r:*") as tar:
            members, declared = [], _Budget(budget.limit)
            for m in tar:  # headers only; sizes are bounded before any data is decompressed past them
                members.append(m)
                if len(members) > MAX_MEMBERS:
                    raise AdapterError(f"the archive has more than {MAX_MEMBERS} members")
                _refuse_pickle(m.name)
                if not (m.isreg() or m.isdir()):
                    raise AdapterError(f"archive member {m.name!r} is a link or special file; only plain files")
                declared.take(m.size)
                budget.declare(m.name, m.size)
            # a tar member holds exactly its declared bytes, so the ratio is known before anything is written
            _check_ratio(declared.limit - declared.left, packed)
            files = {_member_path(m.name): m for m in members if m.isreg()}
            folder = _pick(list(files))
            for path, m in files.items():
                if _wanted(path, folder):
                    fobj = tar.extractfile(m)
                    assert fobj is not None  # regular members always have data
                    write_stream(fobj, dest / path.name, budget)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:  # corrupt compressed data
        raise AdapterError(f"the archive could not be read as .tar/.tar.gz: {exc}") from None


def _extract_zip(src: BinaryIO, dest: Path, budget: _Budget) -> None:
    try:
        with zipfile.ZipFile(src) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise AdapterError(f"the archive has more than {MAX_MEMBERS} members")
            for info in infos:
                _refuse_pickle(info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip was not made on Unix
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise AdapterError(f"archive member {info.filename!r} is a link or special file")
            files = {_member_path(i.filename): i for i in infos if not i.is_dir()}
            folder = _pick(list(files))
            for path, info in files.items():
                if _wanted(path, folder):  # declared sizes first (refused before any byte is written) ...
                    budget.declare(info.filename, info.file_size)
                    _check_ratio(info.file_size, info.compress_size)
            for path, info in files.items():
                if _wanted(path, folder):  # ... then what really comes out, against both bounds
                    member = _Budget(budget.left, compressed=lambda info=info: info.compress_size)
                    with zf.open(info) as fobj:
                        write_stream(fobj, dest / path.name, member)
                    budget.take(budget.left - member.left)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError, zlib.error,
            RuntimeError) as exc:  # RuntimeError: an encrypted member
        raise AdapterError(f"the archive could not be read as .zip: {exc}") from None


def extract_archive(src: BinaryIO, dest: Path, max_bytes: int) -> None:
    """Unpack a .tar/.tar.gz/.tgz/.zip (detected by content) of one PEFT folder into dest."""
    head = src.read(4)
    src.seek(0)
    budget = _Budget(max_bytes)
    if head.startswith(b"PK"):
        _extract_zip(src, dest, budget)
    else:
        _extract_tar(src, dest, budget)
