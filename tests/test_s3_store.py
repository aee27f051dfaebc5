"""adapters/s3store.py against a real S3-compatible server (moto's server mode): immutable versions
published by a conditional pointer swap, lazy cached reads with conditional GETs, interrupted and
concurrent uploads, and a store that cannot be reached."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from lora_factory import TINY_SHAPES
from s3_harness import S3Server, s3_server

from hotlora.adapters.peft_format import AdapterError, check_compatible, load_peft_adapter
from hotlora.adapters.s3store import ConcurrentUpdate, S3AdapterStore, StoreUnavailable
from hotlora.adapters.store import AdapterNotFound, InvalidAdapterName

WEIGHTS = "adapter_model.safetensors"


def make(s3: S3Server, cache: Path, prefix: str, endpoint: str | None = None) -> S3AdapterStore:
    return S3AdapterStore(s3.url(prefix), cache, check=lambda a: check_compatible(a, TINY_SHAPES, 2, 4),
                          endpoint_url=endpoint or s3.endpoint)


def sha(folder: Path) -> str:
    return hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()


def test_upload_is_read_by_another_replica_then_swapped_then_deleted(s3, store_folders, tmp_path):
    writer, reader = make(s3, tmp_path / "w", "swap"), make(s3, tmp_path / "r", "swap")
    stored = writer.put_folder("a", store_folders["r2"])
    assert stored.previous is None and sha(stored.path) == sha(store_folders["r2"])
    assert reader.list() == ["a"]
    first = reader.sync("a")
    assert sha(first) == sha(store_folders["r2"]) and first.is_relative_to(tmp_path / "r")
    writer.put_folder("a", store_folders["r4"])
    assert reader.sync("a", max_age=60.0) == first  # within the TTL the pointer is not read again
    second = reader.sync("a", max_age=0.0)  # conditional GET: a new ETag, a new version
    assert second != first and sha(second) == sha(store_folders["r4"])
    assert first.is_dir()  # the replaced version stays cached for its grace time (running sequences)
    assert reader.sync("a", max_age=0.0) == second  # 304: unchanged
    writer.delete("a")
    with pytest.raises(AdapterNotFound):
        reader.sync("a", max_age=0.0)
    assert "a" not in reader and reader.list() == []
    with pytest.raises(AdapterNotFound):
        writer.delete("a")


def test_restart_keeps_what_was_cached(s3, store_folders, tmp_path):
    make(s3, tmp_path / "w", "restart").put_folder("a", store_folders["r2"])
    make(s3, tmp_path / "r", "restart").sync("a")
    again = make(s3, tmp_path / "r", "restart")
    assert "a" in again and sha(again.path("a")) == sha(store_folders["r2"])


def test_invalid_uploads_write_nothing(s3, store_folders, tmp_path):
    store = make(s3, tmp_path / "w", "invalid")
    with pytest.raises(AdapterError):  # rank 8 is above the check's maximum 4
        store.put_folder("a", store_folders["r8"])
    with pytest.raises(InvalidAdapterName):
        store.put_folder("../a", store_folders["r2"])
    assert s3.keys("invalid/") == []


@pytest.mark.parametrize("step", ["object:adapter_config.json", "object:adapter_model.safetensors", "pointer"])
@pytest.mark.parametrize("replacing", [False, True], ids=["new", "replace"])
def test_interrupted_upload_never_publishes_a_partial_version(s3, store_folders, tmp_path, step, replacing):
    prefix = f"cut-{step.split(':')[-1]}-{replacing}"
    store = make(s3, tmp_path / "w", prefix)
    if replacing:
        store.put_folder("a", store_folders["r2"])
    before = s3.keys(f"{prefix}/")

    def cut(at: str) -> None:
        if at == step:
            raise ConnectionResetError(f"connection lost before {at}")

    store.fault = cut
    with pytest.raises(ConnectionResetError):
        store.put_folder("a", store_folders["r4"])
    reader = make(s3, tmp_path / "r", prefix)
    if replacing:
        assert sha(reader.sync("a")) == sha(store_folders["r2"])
    else:
        with pytest.raises(AdapterNotFound):
            reader.sync("a")
    assert s3.keys(f"{prefix}/") == before  # the cut upload's objects are removed too


def test_two_concurrent_uploads_leave_exactly_one_intact(s3, store_folders, tmp_path):
    stores = [make(s3, tmp_path / f"w{i}", "race") for i in range(2)]
    stores[0].put_folder("a", store_folders["r2"])
    both_uploaded = threading.Barrier(2, timeout=30)
    for store in stores:  # each has written its version's objects before either swaps the pointer
        store.fault = lambda at: both_uploaded.wait() if at == "pointer" else None
    results: dict[int, object] = {}

    def upload(i: int, folder: Path) -> None:
        try:
            results[i] = stores[i].put_folder("a", folder)
        except ConcurrentUpdate as exc:
            results[i] = exc

    threads = [threading.Thread(target=upload, args=(i, store_folders[k])) for i, k in enumerate(("r4", "r2"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [i for i, r in results.items() if not isinstance(r, Exception)]
    assert len(winners) == 1 and len(results) == 2, results
    reader = make(s3, tmp_path / "r", "race")
    got = reader.sync("a")
    assert sha(got) == sha(store_folders[("r4", "r2")[winners[0]]])
    assert load_peft_adapter(got, "a").config.rank == (4, 2)[winners[0]]
    versions = {k.split("/")[3] for k in s3.keys("race/versions/a/")}
    assert len(versions) == 2  # the first put's and the winner's; the loser removed its objects


def test_unreachable_store_serves_the_cache_and_refuses_the_rest(store_folders, tmp_path):
    with s3_server() as s3:
        writer = make(s3, tmp_path / "w", "down")
        writer.put_folder("a", store_folders["r2"])
        writer.put_folder("b", store_folders["r4"])
        replica = make(s3, tmp_path / "r", "down")
        cached = replica.sync("a")
        s3.stop()
        assert replica.sync("a", max_age=0.0) == cached
        with pytest.raises(StoreUnavailable):
            replica.sync("b", max_age=0.0)
        assert replica.list() == ["a"]
        restarted = make(s3, tmp_path / "r", "down")  # a restart while the store is down
        assert restarted.sync("a", max_age=0.0) == cached
        with pytest.raises(StoreUnavailable):
            writer.put_folder("c", store_folders["r2"])
