"""adapters/store.py: atomic puts, safe archives, rollback, restart, races."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from lora_factory import TINY_SHAPES

from hotlora.adapters.peft_format import AdapterError, check_compatible, load_peft_adapter
from hotlora.adapters.store import (
    AdapterNotFound,
    AdapterStore,
    InvalidAdapterName,
    UploadTooLarge,
)


def make_store(root: Path, **kw) -> AdapterStore:
    return AdapterStore(root, check=lambda a: check_compatible(a, TINY_SHAPES, 2, 4), **kw)


def files_of(folder: Path) -> dict[str, io.BytesIO]:
    return {n: io.BytesIO((folder / n).read_bytes()) for n in ("adapter_config.json", "adapter_model.safetensors")}


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def leftovers(root: Path) -> list[str]:
    meta = root / ".hotlora~"
    return sorted(str(p.relative_to(root)) for d in ("tmp", "versions") for p in (meta / d).iterdir())


def tar_of(entries: dict[str, bytes], links: dict[str, str] | None = None, mode: str = "w:gz") -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    buf.seek(0)
    return buf


def zip_of(entries: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    buf.seek(0)
    return buf


def peft_entries(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def test_put_list_path_delete_and_restart(tmp_path, store_folders):
    store = make_store(tmp_path)
    stored = store.put_files("task-a.v1", files_of(store_folders["r2"]))
    assert store.list() == ["task-a.v1"] and "task-a.v1" in store
    assert stored.previous is None and stored.adapter.config.rank == 2
    assert digest(store.path("task-a.v1")) == digest(store_folders["r2"]) == stored.adapter.sha256
    assert (tmp_path / "task-a.v1").is_symlink()
    again = make_store(tmp_path)  # a restart
    assert again.list() == ["task-a.v1"] and digest(again.path("task-a.v1")) == digest(store_folders["r2"])
    again.delete("task-a.v1")
    assert again.list() == [] and "task-a.v1" not in again and leftovers(tmp_path) == []
    with pytest.raises(AdapterNotFound):
        again.path("task-a.v1")
    with pytest.raises(AdapterNotFound):
        again.delete("task-a.v1")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "x" * 65, "a b", "ü", "a@b", ".hotlora~", "a\x00"])
def test_bad_names_are_refused(tmp_path, store_folders, name):
    store = make_store(tmp_path)
    with pytest.raises(InvalidAdapterName, match="invalid adapter name"):
        store.put_files(name, files_of(store_folders["r2"]))
    assert store.list() == [] and leftovers(tmp_path) == []


def test_replace_keeps_previous_then_drops_it(tmp_path, store_folders):
    store = make_store(tmp_path, grace_s=0)
    first = store.put_files("a", files_of(store_folders["r2"]))
    second = store.put_files("a", files_of(store_folders["r4"]))
    assert second.previous == first.path and first.path.is_dir()  # still readable by in-flight loads
    assert digest(store.path("a")) == digest(store_folders["r4"])
    third = store.put_files("a", files_of(store_folders["r2"]))
    assert third.previous == second.path and not first.path.exists()
    store.restore("a", second.path)  # rollback
    assert digest(store.path("a")) == digest(store_folders["r4"])


def test_invalid_upload_leaves_nothing_and_keeps_old(tmp_path, store_folders):
    store = make_store(tmp_path)
    store.put_files("a", files_of(store_folders["r2"]))
    before = leftovers(tmp_path)
    bad = files_of(store_folders["r2"])
    bad["adapter_config.json"] = io.BytesIO(b'{"peft_type": "LORA", "r": 2, "use_dora": true}')
    with pytest.raises(AdapterError, match="DoRA"):
        store.put_files("a", bad)
    with pytest.raises(AdapterError, match="maximum LoRA rank 4"):  # the store's compatibility check
        store.put_files("a", files_of(store_folders["r8"]))
    with pytest.raises(AdapterError, match="needs both"):
        store.put_files("a", {"adapter_config.json": files_of(store_folders["r2"])["adapter_config.json"]})
    with pytest.raises(AdapterError, match="pickled"):
        store.put_files("a", {"adapter_model.bin": io.BytesIO(b"x")})
    with pytest.raises(AdapterError, match="unexpected file"):
        store.put_files("a", {"evil.sh": io.BytesIO(b"x")})
    with pytest.raises(UploadTooLarge):
        make_store(tmp_path, max_bytes=1000).put_files("a", files_of(store_folders["r2"]))
    assert leftovers(tmp_path) == before and digest(store.path("a")) == digest(store_folders["r2"])


def test_interrupted_put_leaves_nothing(tmp_path, store_folders):
    store = make_store(tmp_path)

    class Boom(io.BytesIO):
        def read(self, n=-1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.put_files("a", {"adapter_config.json": Boom()})
    assert store.list() == [] and leftovers(tmp_path) == []


def test_crashed_puts_are_cleaned_at_start_and_hand_placed_folders_adopted(tmp_path, store_folders):
    store = make_store(tmp_path)
    store.put_files("kept", files_of(store_folders["r2"]))
    store.put_files("kept", files_of(store_folders["r2"]))  # the replaced version lives through its grace time
    meta = tmp_path / ".hotlora~"
    (meta / "tmp" / "x@123-dead").mkdir()  # died while staging
    (meta / "tmp" / "x@123-dead" / "adapter_config.json").write_text("{}")
    (meta / "versions" / "x@124-dead").mkdir()  # died between rename and publish
    (tmp_path / "by-hand").mkdir()
    for n, data in peft_entries(store_folders["r4"]).items():
        (tmp_path / "by-hand" / n).write_bytes(data)
    store = make_store(tmp_path)
    assert store.list() == ["by-hand", "kept"] and (tmp_path / "by-hand").is_symlink()
    assert store.adopted == {"by-hand"}
    assert digest(store.path("by-hand")) == digest(store_folders["r4"])
    assert sorted(p.name.split("@")[0] for p in (meta / "versions").iterdir()) == ["by-hand", "kept", "kept"]
    make_store(tmp_path, grace_s=0)
    assert sorted(p.name.split("@")[0] for p in (meta / "versions").iterdir()) == ["by-hand", "kept"]
    assert list((meta / "tmp").iterdir()) == []


@pytest.mark.parametrize("archive", ["tgz-root", "tgz-folder", "tar", "zip-root", "zip-folder"])
def test_archives(tmp_path, store_folders, archive):
    kind, where = archive.split("-") if "-" in archive else (archive, "root")
    prefix = "" if where == "root" else "my-adapter/"
    entries = peft_entries(store_folders["r4"], prefix) | {prefix + "README.md": b"hi", "other/notes.txt": b"ignored"}
    buf = zip_of(entries) if kind == "zip" else tar_of(entries, mode="w:gz" if kind == "tgz" else "w")
    store = make_store(tmp_path)
    store.put_archive("arch", buf)
    path = store.path("arch")
    assert digest(path) == digest(store_folders["r4"])
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def _corrupt(buf: io.BytesIO) -> io.BytesIO:
    """The compressed stream's bytes past its header inverted: the decompressor itself fails."""
    data = bytearray(buf.getvalue())
    data[24:88] = bytes(b ^ 0xFF for b in data[24:88])
    return io.BytesIO(bytes(data))


def _encrypted(buf: io.BytesIO) -> io.BytesIO:
    """Every member flagged as encrypted (general-purpose bit 0, in its local and central headers)."""
    data = bytearray(buf.getvalue())
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(sig)
        while at >= 0:
            data[at + offset] |= 1
            at = data.find(sig, at + 4)
    return io.BytesIO(bytes(data))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda f: tar_of(peft_entries(f), links={"adapter_model.safetensors.lnk": "/etc/passwd"}), "link"),
        (lambda f: tar_of({"../adapter_config.json": b"{}"} | peft_entries(f, "x/")), "parent-relative"),
        (lambda f: tar_of({"/abs/adapter_config.json": b"{}"}), "absolute"),
        (lambda f: tar_of(peft_entries(f) | {"training_args.bin": b"pickle"}), "pickled"),
        (lambda f: zip_of(peft_entries(f) | {"optimizer.pt": b"pickle"}), "pickled"),
        (lambda f: zip_of({"../../x/adapter_config.json": b"{}"}), "parent-relative"),
        (lambda f: tar_of(peft_entries(f) | peft_entries(f, "b/")), "more than one"),
        (lambda f: tar_of({"README.md": b"no config"}), "holds no adapter_config.json"),
        (lambda f: io.BytesIO(b"this is not an archive at all"), "could not be read"),
        (lambda f: io.BytesIO(b"PK\x03\x04 truncated zip"), "could not be read"),
        (lambda f: _corrupt(tar_of(peft_entries(f), mode="w:gz")), "could not be read"),  # zlib.error
        (lambda f: _corrupt(tar_of(peft_entries(f), mode="w:xz")), "could not be read"),  # lzma.LZMAError
        (lambda f: _encrypted(zip_of(peft_entries(f))), "could not be read"),  # zipfile's RuntimeError
    ],
)
def test_bad_archives_are_refused(tmp_path, store_folders, build, match):
    store = make_store(tmp_path)
    with pytest.raises(AdapterError, match=match):
        store.put_archive("arch", build(store_folders["r4"]))
    assert store.list() == [] and leftovers(tmp_path) == []


def test_decompression_bombs_are_refused(tmp_path, store_folders):
    store = make_store(tmp_path, max_bytes=200_000)
    big = b"\0" * 5_000_000  # compresses to a few kB
    with pytest.raises(UploadTooLarge):
        store.put_archive("bomb", tar_of(peft_entries(store_folders["r2"]) | {"filler.txt": big}))
    with pytest.raises(UploadTooLarge):
        store.put_archive("bomb", zip_of({"adapter_config.json": b"{}", "adapter_model.safetensors": big}))
    assert store.list() == [] and leftovers(tmp_path) == []


def test_concurrent_puts_never_mix_and_readers_see_whole_versions(tmp_path, store_folders):
    store = make_store(tmp_path)
    store.put_files("hot", files_of(store_folders["r2"]))
    stop, errors = threading.Event(), []

    def writer(src: Path) -> None:
        try:
            for _ in range(8):
                make_store(tmp_path).put_files("hot", files_of(src))  # a store per writer, like separate processes
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    def reader() -> None:
        while not stop.is_set():
            try:
                adapter = load_peft_adapter(store.path("hot"), "hot")  # r2 config + r4 tensors would raise
                assert adapter.sha256 in {digest(store_folders["r2"]), digest(store_folders["r4"])}
            except Exception as exc:
                errors.append(exc)

    writers = [threading.Thread(target=writer, args=(store_folders[k],)) for k in ("r2", "r4")]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    assert digest(store.path("hot")) in {digest(store_folders["r2"]), digest(store_folders["r4"])}
    # retired ones wait out grace_s, the most recent max_retired of them at most: 16 puts leave 2 + 4
    assert len(list((tmp_path / ".hotlora~" / "versions").iterdir())) == 2 + store.max_retired
    make_store(tmp_path, grace_s=0)  # once grace_s is over, a restart drops every version no name points at
    assert len(list((tmp_path / ".hotlora~" / "versions").iterdir())) == 1
    assert list((tmp_path / ".hotlora~" / "tmp").iterdir()) == []
