"""vLLM's runtime LoRA API (POST /v1/load_lora_adapter, /v1/unload_lora_adapter) on a real server: an adapter loaded
from a folder under --allowed-lora-paths answers as the same PEFT folder uploaded through the admin API, hot;
load_inplace swaps it; unloading deletes it. The admin token guards it, and no path outside the allowed folders,
through a symlink or not, is read."""

from __future__ import annotations

import dataclasses
import os
import shutil

import httpx
import pytest
from server_harness import (
    ADAPTER_FILES,
    AUTH,
    ServerThread,
    assert_openai_error,
    complete_http,
    server_settings,
    upload,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory, peft_dirs):
    """The allowed folder: copies of adapters a and b, and traps that lead outside it."""
    base = tmp_path_factory.mktemp("loras")
    outside = tmp_path_factory.mktemp("outside")
    for name in ("a", "b"):
        shutil.copytree(peft_dirs[name], base / name)
        shutil.copytree(peft_dirs[name], outside / name)
    os.symlink(outside / "a", base / "linked-folder")  # the folder itself leads outside
    (base / "linked-file").mkdir()
    shutil.copy(peft_dirs["a"] / ADAPTER_FILES[0], base / "linked-file" / ADAPTER_FILES[0])
    os.symlink(outside / "a" / ADAPTER_FILES[1], base / "linked-file" / ADAPTER_FILES[1])  # one file does
    (base / "no-weights").mkdir()
    shutil.copy(peft_dirs["a"] / ADAPTER_FILES[0], base / "no-weights" / ADAPTER_FILES[0])
    (base / "blobs").mkdir()  # a Hugging Face cache snapshot: its files are links to blobs, inside the folder
    (base / "snapshot").mkdir()
    for n in ADAPTER_FILES:
        shutil.copy(peft_dirs["b"] / n, base / "blobs" / n)
        os.symlink(base / "blobs" / n, base / "snapshot" / n)
    (base / "dir-weights").mkdir()
    shutil.copy(peft_dirs["a"] / ADAPTER_FILES[0], base / "dir-weights" / ADAPTER_FILES[0])
    (base / "dir-weights" / ADAPTER_FILES[1]).mkdir()
    (base / "fifo").mkdir()
    shutil.copy(peft_dirs["a"] / ADAPTER_FILES[0], base / "fifo" / ADAPTER_FILES[0])
    os.mkfifo(base / "fifo" / ADAPTER_FILES[1])  # opened for reading, a FIFO would wait for a writer forever
    return base, outside


@pytest.fixture(scope="module")
def server(tmp_path_factory, hotlora_cache, root):
    store = tmp_path_factory.mktemp("store")
    (store / "bad").mkdir()  # copied in by hand, invalid: refused at start, its name still taken
    (store / "bad" / ADAPTER_FILES[0]).write_text("{not json")
    settings = server_settings(store, hotlora_cache, max_loras=4)
    srv = ServerThread(dataclasses.replace(settings, allowed_lora_paths=(root[0],))).start()
    yield srv
    srv.stop()


def _load(http: httpx.Client, name: str, path, inplace: bool = False, auth=AUTH) -> httpx.Response:
    body = {"lora_name": name, "lora_path": str(path)} | ({"load_inplace": True} if inplace else {})
    return http.post("/v1/load_lora_adapter", json=body, headers=auth)


def _text(http: httpx.Client, model: str) -> str:
    return complete_http(http, model, max_tokens=8)["choices"][0]["text"]


def test_a_loaded_folder_serves_as_its_upload_does_and_unloads(http, root, peft_dirs):
    base, _ = root
    for ref, src in (("aref", "a"), ("bref", "b")):
        assert upload(http, ref, peft_dirs[src]).status_code == 201
    r = _load(http, "sql", base / "a")
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql' added successfully.")
    assert "sql" in {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert _text(http, "sql") == _text(http, "aref") != _text(http, "bref")
    assert_openai_error(_load(http, "sql", base / "b"), 400, "already loaded")
    assert _text(http, "sql") == _text(http, "aref")
    assert _load(http, "sql", base / "b", inplace=True).status_code == 200  # hot swap
    assert _text(http, "sql") == _text(http, "bref")
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=AUTH)
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
    assert "sql" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert_openai_error(http.post("/v1/completions", json={"model": "sql", "prompt": "x"}), 404, "does not exist")
    assert_openai_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=AUTH), 404, "sql")
    assert (base / "b" / ADAPTER_FILES[1]).is_file()  # the folder it came from is left alone


def test_nothing_outside_the_allowed_folders_is_read(http, root, server):
    base, outside = root
    assert_openai_error(_load(http, "x", outside / "a"), 403, "outside --allowed-lora-paths")
    assert_openai_error(_load(http, "x", outside / "missing"), 403, "outside")  # existing or not: no oracle
    assert_openai_error(_load(http, "x", base / ".." / outside.name / "a"), 403, "outside")
    assert_openai_error(_load(http, "x", base / "linked-folder"), 403, "outside")
    assert_openai_error(_load(http, "x", base / "linked-file"), 403, "outside")
    assert_openai_error(_load(http, "x", base / "missing"), 400, "No such file")
    assert_openai_error(_load(http, "x", f"{base}/a\x00b"), 400, "lora_path")
    assert_openai_error(_load(http, "x", base / "a" / ADAPTER_FILES[0]), 400, "Not a directory")
    assert_openai_error(_load(http, "x", base / "no-weights"), 400, "invalid adapter")
    open_fds = len(os.listdir("/proc/self/fd"))  # the server runs in this process
    for _ in range(3):  # a folder named like the weights: a 400 each time, no descriptor left open
        assert_openai_error(_load(http, "x", base / "dir-weights"), 400, "not a regular file")
    assert len(os.listdir("/proc/self/fd")) <= open_fds
    assert_openai_error(_load(http, "x", base / "fifo"), 400, "not a regular file")
    assert http.get("/admin/adapters/x", headers=AUTH).status_code == 404  # no partial adapter left behind
    server.state.settings.allowed_lora_paths = ()
    try:
        assert_openai_error(_load(http, "x", base / "a"), 403, "--allowed-lora-paths")
    finally:
        server.state.settings.allowed_lora_paths = (base,)


@pytest.mark.parametrize("body, auth, status, match", [
    ({"lora_name": "x", "lora_path": "/"}, {}, 401, "bearer"),
    ({"lora_name": "x", "lora_path": "/"}, {"Authorization": "Bearer wrong"}, 401, ""),
    ({"lora_name": "../x", "lora_path": "/"}, AUTH, 400, "name"),
    ({"lora_name": "x"}, AUTH, 400, "lora_path"),
    ({"lora_name": "x", "lora_path": "/", "base_model_name": "y"}, AUTH, 400, "base_model_name"),
])
def test_bad_requests_are_refused(http, body, auth, status, match):
    assert_openai_error(http.post("/v1/load_lora_adapter", json=body, headers=auth), status, match)


def test_the_base_model_name_is_no_adapter_name(http, server, root):
    assert_openai_error(_load(http, server.state.model_name, root[0] / "a"), 409, "base model")


def test_links_inside_the_allowed_folders_are_followed(http, root, peft_dirs):
    assert _load(http, "snap", root[0] / "snapshot").status_code == 200
    assert upload(http, "bref2", peft_dirs["b"]).status_code == 201
    assert _text(http, "snap") == _text(http, "bref2")


def test_a_name_refused_at_start_is_taken_unless_replaced(http, root):
    assert http.post("/v1/completions", json={"model": "bad", "prompt": "x"}).status_code == 404
    assert_openai_error(_load(http, "bad", root[0] / "a"), 400, "already loaded")
    assert _load(http, "bad", root[0] / "a", inplace=True).status_code == 200
    assert http.post("/v1/completions", json={"model": "bad", "prompt": "x", "max_tokens": 1}).status_code == 200
