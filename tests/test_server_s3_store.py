"""The server on the shared S3 store (moto's server mode): a version written by another replica is served
at once on a cold load and within the TTL when resident, running sequences finish on the old version,
deletes reach it, uploads reach the store, and when the store is down, what is cached is still served."""

from __future__ import annotations

import time

import httpx
import pytest
from server_harness import AUTH, ServerThread, assert_openai_error, server_settings, upload

from hotlora.adapters.s3store import S3AdapterStore

PROMPT = "The three primary colors are"
TTL = 1.0


@pytest.fixture(scope="module")
def server(s3, tmp_path_factory, hotlora_cache):
    settings = server_settings(tmp_path_factory.mktemp("cache"), hotlora_cache)
    settings.adapter_store, settings.s3_endpoint_url, settings.adapter_store_ttl_s = s3.url("srv"), s3.endpoint, TTL
    srv = ServerThread(settings).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def other(s3, tmp_path_factory) -> S3AdapterStore:
    """Another replica's view of the same store: writes that this server learns of through the store."""
    return S3AdapterStore(s3.url("srv"), tmp_path_factory.mktemp("other"), endpoint_url=s3.endpoint)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


def complete(http: httpx.Client, model: str, n: int = 6) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    return http.post("/v1/completions", json=body)


def text(http: httpx.Client, model: str, n: int = 6) -> str:
    r = complete(http, model, n)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_other_replicas_writes_are_served_swapped_and_deleted(http, server, other, peft_dirs):
    n = 32  # long enough that the swap lands while it runs
    other.put_folder("x-ref", peft_dirs["x"])
    other.put_folder("y-ref", peft_dirs["y"])
    other.put_folder("swap", peft_dirs["x"])
    old, new = text(http, "x-ref", n), text(http, "y-ref", n)
    assert old != new and text(http, "swap", n) == old  # a cold load reads the pointer at once
    assert "swap" in {m["id"] for m in http.get("/v1/models").json()["data"]}
    body = {"model": "swap", "prompt": PROMPT, "max_tokens": n, "stream": True, "temperature": 0, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        other.put_folder("swap", peft_dirs["y"])
        assert server.call(server.engine.stats).num_running == 1, "the first request finished before the swap"
        time.sleep(TTL)  # past the TTL, new requests get the new version
        assert text(http, "swap", n) == new
        rest = [line for line in lines if line.startswith("data: {")]
    texts = [httpx.Response(200, content=line[6:]).json()["choices"][0]["text"] for line in [first, *rest]]
    assert "".join(texts) == old  # the running sequence finished on the old version
    other.delete("swap")
    time.sleep(TTL)
    assert complete(http, "swap").status_code == 404


def test_an_adapter_only_another_replica_wrote_is_exported_and_unloaded(http, other, peft_dirs):
    """Export and unload sync the name from the store first, as a request does (export was a 404 here)."""
    other.put_folder("elsewhere", peft_dirs["c"])
    with http.stream("POST", "/admin/adapters/elsewhere/export", headers=AUTH, params={"dtype": "bfloat16"}) as r:
        assert r.status_code == 200, r.read()
        head = next(r.iter_bytes(512))
    assert b"-elsewhere" in head  # the archive's top folder: <model>-<adapter>
    r = http.post("/admin/adapters/unsynced/unload", headers=AUTH)
    assert r.status_code == 404
    other.put_folder("unsynced", peft_dirs["a"])
    r = http.post("/admin/adapters/unsynced/unload", headers=AUTH)
    assert r.status_code == 200 and r.json()["name"] == "unsynced", r.text


def test_unknown_names_leave_no_lock_behind(http, server):
    """Each request's adapter name is synced from the store under a per-name lock: one kept per name a client
    ever sent would grow without bound (no admin token needed)."""
    for i in range(20):
        assert complete(http, f"never-uploaded-{i}").status_code == 404
    assert server.state._locks == {}


def test_uploads_go_to_the_store(http, other, peft_dirs):
    r = upload(http, "up", peft_dirs["a"])
    assert r.status_code == 201, r.text
    assert (other.sync("up") / "adapter_model.safetensors").read_bytes() == (
        peft_dirs["a"] / "adapter_model.safetensors"
    ).read_bytes()
    assert upload(http, "up", peft_dirs["c"]).json()["replaced"] is True
    assert http.delete("/admin/adapters/up", headers=AUTH).status_code == 200
    assert "up" not in other.list()


def test_unreachable_store_serves_cached_and_503_for_the_rest(http, s3, other, peft_dirs):
    other.put_folder("cached", peft_dirs["a"])
    other.put_folder("never-read", peft_dirs["b"])
    expected = text(http, "cached")
    assert http.post("/admin/adapters/cached/load", headers=AUTH).status_code == 200  # pinned
    s3.stop()
    time.sleep(TTL)
    assert text(http, "cached") == expected
    # the store cannot delete it, so nothing changes here either: still registered, pinned, served
    assert_openai_error(http.delete("/admin/adapters/cached", headers=AUTH), 503, "")
    infos = {a["name"]: a for a in http.get("/admin/adapters", headers=AUTH).json()["data"]}
    assert infos["cached"]["pinned"] and infos["cached"]["residency"] == "device"
    assert text(http, "cached") == expected
    assert_openai_error(complete(http, "never-read"), 503, "not cached here")
    assert complete(http, "missing").status_code == 503  # unknown here, and the store cannot say
    assert complete(http, http.get("/v1/models").json()["data"][0]["id"]).status_code == 200  # the base
