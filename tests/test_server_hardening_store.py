"""No upload can hurt the server (issue 9, classes 4, 5, 7, 8, 9): adapter regexes, hand-placed invalid
adapters, dropped uploads, archive bombs and the store's leftovers, through a real uvicorn server. Each
bad upload is handled while /health answers within a second and a stream on adapter "a" completes."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import socket
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from bystander import STREAM_TOKENS, Bystander
from server_harness import AUTH, ServerThread, assert_openai_error, server_settings, until, upload

META = ".hotlora~"


def _config(folder: Path, **changes) -> Path:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory, peft_dirs) -> Path:
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(peft_dirs["a"], root / "a")
    _config(shutil.copytree(peft_dirs["a"], root / "broken"), r=8)  # r=4 tensors: refused at every start
    # "legacy": an invalid version published by an older hotlora (a symlink into versions), not re-validated
    legacy = root / META / "versions" / f"legacy@{time.time_ns()}-00000000"
    _config(shutil.copytree(peft_dirs["a"], legacy), r=8)
    (root / "legacy").symlink_to(os.path.relpath(legacy, root))
    return root


@pytest.fixture(scope="module")
def server(store, hotlora_cache):
    srv = ServerThread(server_settings(store, hotlora_cache)).start()
    yield srv
    srv.stop()


def bystander(server, expected) -> Bystander:
    return Bystander(server.url, "a", expected, STREAM_TOKENS)


def leftovers(store: Path, name: str) -> list[str]:
    """Everything the store holds for `name`: its entry, versions, staging folders, lock file."""
    found = [p.name for p in store.iterdir() if p.name == name]
    for sub in ("versions", "tmp", "locks"):
        found += [
            f"{sub}/{p.name}" for p in (store / META / sub).iterdir() if p.name.split("@")[0] in (name, f"{name}.lock")
        ]
    return found


# --- 4. regexes -------------------------------------------------------------------------------------


def test_catastrophic_regexes_cannot_freeze_the_process(server, expected, http, peft_dirs, tmp_path, store):
    refused = [
        ({"target_modules": "(.*)*X"}, "selects none"),
        ({"target_modules": r"(q)\1"}, "does not compile"),
        ({"target_modules": "(?=.*q_proj).*"}, "does not compile"),
        ({"exclude_modules": "(a|a)*(" + "x" * 2000 + ")"}, "at most"),
        ({"layers_to_transform": [0], "layers_pattern": "(?<=x)layers"}, "does not compile"),
    ]
    with bystander(server, expected):
        for i, changes in enumerate(refused):
            folder = _config(shutil.copytree(peft_dirs["a"], tmp_path / f"re{i}"), **changes[0])
            assert_openai_error(upload(http, f"re{i}", folder), 400, changes[1])
            assert leftovers(store, f"re{i}") == []
        # a pattern that backtracks exponentially in Python's re runs in linear time here, and means the same
        folder = _config(shutil.copytree(peft_dirs["a"], tmp_path / "ok"), exclude_modules="(.*)*X")
        t0 = time.monotonic()
        assert upload(http, "re-ok", folder).status_code == 201 and time.monotonic() - t0 < 10
    assert http.delete("/admin/adapters/re-ok", headers=AUTH).status_code == 200


# --- 5. hand-placed invalid adapters ----------------------------------------------------------------


def _check_refused(srv: ServerThread, store: Path) -> None:
    models = {m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]}
    assert "broken" not in models and "a" in models
    r = httpx.post(srv.url + "/v1/completions", json={"model": "broken", "prompt": "Hi", "max_tokens": 1})
    assert_openai_error(r, 404, "rank 4 does not match r=8")
    assert (store / "broken").is_dir() and not (store / "broken").is_symlink()  # left where it was put
    assert not [p for p in (store / META / "versions").iterdir() if p.name.startswith("broken@")]


def test_invalid_hand_placed_adapter_stays_refused_across_restarts(server, expected, store, hotlora_cache):
    with bystander(server, expected):
        _check_refused(server, store)
        r = httpx.post(server.url + "/v1/completions", json={"model": "legacy", "prompt": "Hi", "max_tokens": 1})
        err = assert_openai_error(r, 400, "rank 4 does not match r=8")  # fails to load: a 4xx, never a 500
        assert err["code"] == "invalid_adapter"
    again = ServerThread(server_settings(store, hotlora_cache)).start()  # the restart that used to serve it
    try:
        _check_refused(again, store)
    finally:
        again.stop()


# --- 7. dropped uploads -----------------------------------------------------------------------------


def test_dropped_upload_is_a_client_close(server, expected, store, caplog):
    head = (
        "POST /admin/adapters/dropped HTTP/1.1\r\nHost: x\r\nAuthorization: " + AUTH["Authorization"] + "\r\n"
        "Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: 10485760\r\n\r\n"
    ).encode()
    part = b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="adapter_model.safetensors"\r\n\r\n'
    with caplog.at_level(logging.INFO, logger="hotlora"), bystander(server, expected):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(head + part + b"\0" * (1 << 20))  # a tenth of what was announced, then gone
        until(lambda: 'status="499"' in httpx.get(server.url + "/metrics").text, what="the 499")
    metrics = httpx.get(server.url + "/metrics").text
    assert 'route="/admin/adapters/{name}",status="499"' in metrics and 'status="500"' not in metrics
    closed = [r for r in caplog.records if "closed the connection" in r.getMessage()]
    assert closed and all(r.levelno == logging.INFO for r in closed)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert leftovers(store, "dropped") == []


# --- 8. archive bombs -------------------------------------------------------------------------------


def _zip_bomb(config: bytes, size: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", config)
        with zf.open("adapter_model.safetensors", "w", force_zip64=True) as f:
            for _ in range(size >> 20):
                f.write(bytes(1 << 20))
    return buf.getvalue()


def _tar_bomb(config: bytes, size: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in (("adapter_config.json", config), ("adapter_model.safetensors", bytes(size))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=1)


def test_archive_bombs_are_refused_before_they_are_written(server, expected, http, peft_dirs, store):
    config = (peft_dirs["a"] / "adapter_config.json").read_bytes()
    bound = server.state.store.max_bytes
    assert bound < 64 << 20  # an r=16 adapter of the 135M base, not the 4 GiB upload limit
    zip_bomb = _zip_bomb(config, 128 << 20)
    tar_bomb = _tar_bomb(config, bound - (4 << 20))  # under the size bound: caught by the ratio
    with bystander(server, expected):
        t0 = time.monotonic()
        r = http.post("/admin/adapters/zbomb", files={"archive": ("a.zip", zip_bomb)}, headers=AUTH)
        assert_openai_error(r, 413, "declares")
        r = http.post("/admin/adapters/tbomb", content=tar_bomb, headers=AUTH | {"content-type": "application/gzip"})
        assert_openai_error(r, 413, "bomb")
        assert time.monotonic() - t0 < 30
    for name in ("zbomb", "tbomb"):
        assert leftovers(store, name) == []


# --- 9. loose ends ----------------------------------------------------------------------------------


def test_openapi_describes_what_the_server_does(http):
    text = http.get("/openapi.json").text
    spec = json.loads(text)
    assert '"422"' not in text and "HTTPValidationError" not in text
    assert '"maximum": 9223372036854775807' in text.replace(
        '"maximum":9223372036854775807', '"maximum": 9223372036854775807'
    )
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, item in spec["paths"].items():
        for op in item.values():
            assert "400" in op["responses"] and "default" in op["responses"]
            admin = path.startswith("/admin") or path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
            assert (op.get("security") == [{"bearerAuth": []}]) == admin
    body = spec["paths"]["/admin/adapters/{name}"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/gzip", "application/zip"} <= set(body)


def test_nbytes_versions_and_locks(server, http, peft_dirs, store, tmp_path):
    for _ in range(6):  # fast re-uploads: replaced versions do not pile up
        r = upload(http, "again", peft_dirs["a"])
        assert r.status_code in (200, 201), r.text
    versions = [p for p in (store / META / "versions").iterdir() if p.name.startswith("again@")]
    assert len(versions) <= 2 + server.state.store.max_retired
    listed = {a["name"]: a for a in http.get("/admin/adapters", headers=AUTH).json()["data"]}
    size = (peft_dirs["a"] / "adapter_model.safetensors").stat().st_size
    assert r.json()["nbytes"] == listed["again"]["nbytes"] == size
    assert http.delete("/admin/adapters/again", headers=AUTH).status_code == 200
    assert leftovers(store, "again") == []
    bad = _config(shutil.copytree(peft_dirs["a"], tmp_path / "bad"), r=8)
    assert_openai_error(upload(http, "rejected", bad), 400, "does not match")
    assert leftovers(store, "rejected") == []
