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
    (base / "fifo").mkdir()
    shutil.copy(peft_dirs["a"] / ADAPTER_FILES[0], base / "fifo" / ADAPTER_FILES[0])
    os.mkfifo(base / "fifo" / ADAPTER_FILES[1])  # opened for reading, a FIFO would wait for a writer forever
    return base, outside


@pytest.fixture(scope="module")
def server(tmp_path_factory, hotlora_cache, root):
    settings = server_settings(tmp_path_factory.mktemp("store"), hotlora_cache, max_loras=4)
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
    assert_openai_error(_load(http, "x", base / ".." / outside.name / "a"), 403, "outside")
    assert_openai_error(_load(http, "x", base / "linked-folder"), 403, "outside")
    assert_openai_error(_load(http, "x", base / "linked-file"), 400, "cannot read adapter_model.safetensors")
    assert_openai_error(_load(http, "x", base / "missing"), 400, "does not exist")
    assert_openai_error(_load(http, "x", base / "a" / ADAPTER_FILES[0]), 400, "not a folder")
    assert_openai_error(_load(http, "x", base / "no-weights"), 400, "invalid adapter")
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
