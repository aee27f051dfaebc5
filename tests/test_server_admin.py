"""The admin API on a real uvicorn server over the real engine (the default model, --quant none): its auth,
uploads (files and archives), listing, pinning and deletion, refusals that leave the store unchanged, and the
`hotlora adapters` CLI client against it. The OpenAI routes are in test_server_api.py."""

from __future__ import annotations

import concurrent.futures
import io
import json
import tarfile

import httpx
import pytest
from safetensors.torch import load_file, save
from server_harness import AUTH, TOKEN, ServerThread, assert_openai_error, complete_http, server_settings, upload

from hotlora.server.cli import main as cli_main


@pytest.fixture(scope="module")
def server(tmp_path_factory, hotlora_cache):
    srv = ServerThread(server_settings(tmp_path_factory.mktemp("store"), hotlora_cache, max_upload_bytes=16 << 20,
                                       max_loras=2)).start()
    yield srv
    srv.stop()


# --- admin -----------------------------------------------------------------------------------------


def test_admin_auth(http):
    assert_openai_error(http.get("/admin/adapters"), 401, "missing bearer token")
    r = http.get("/admin/adapters", headers={"Authorization": "Bearer wrong"})
    assert_openai_error(r, 401, "invalid admin token")
    assert r.headers["www-authenticate"] == "Bearer"
    assert http.get("/admin/adapters", headers=AUTH).status_code == 200



def test_admin_upload_list_delete(http, server, base, peft_dirs):
    assert upload(http, "task-a", peft_dirs["a"]).status_code == 201
    r = upload(http, "task-a", peft_dirs["b"])
    assert r.status_code == 200 and r.json()["replaced"] and r.json()["rank"] == 8, r.text
    assert [a["name"] for a in http.get("/admin/adapters", headers=AUTH).json()["data"]] == ["task-a"]
    info = http.get("/admin/adapters/task-a", headers=AUTH).json()
    assert (info["name"], info["rank"], info["pinned"]) == ("task-a", 8, False)
    models = http.get("/v1/models").json()["data"]
    assert models[0]["id"] == base and [(m["id"], m["parent"]) for m in models[1:]] == [("task-a", base)]
    assert complete_http(http, "task-a")["choices"][0]["text"] != complete_http(http, base)["choices"][0]["text"]
    pinned = http.post("/admin/adapters/task-a/load", headers=AUTH)
    assert pinned.status_code == 200 and pinned.json()["pinned"] and pinned.json()["residency"] == "device"
    assert http.delete("/admin/adapters/task-a", headers=AUTH).json()["deleted"]
    assert_openai_error(http.delete("/admin/adapters/task-a", headers=AUTH), 404)
    assert_openai_error(http.get("/admin/adapters/task-a", headers=AUTH), 404)
    assert_openai_error(http.post("/admin/adapters/task-a/load", headers=AUTH), 404)
    r = http.post("/v1/completions", json={"model": "task-a", "prompt": [1], "max_tokens": 1})
    assert_openai_error(r, 404, "does not exist")
    assert server.state.store.list() == [] and http.get("/admin/adapters", headers=AUTH).json()["data"] == []


def test_a_pinned_adapter_stays_pinned_across_a_re_upload(http, server, peft_dirs):
    """The new version takes the pin (it was reported pinned while nothing held it resident)."""
    registry = server.engine.registry

    def pinned_slot() -> bool:
        slot = registry.cache.lookup(registry.current["keep-pin"])
        return slot is not None and registry.cache.slots[slot].pinned

    assert upload(http, "keep-pin", peft_dirs["a"]).status_code == 201
    assert http.post("/admin/adapters/keep-pin/load", headers=AUTH).json()["pinned"]
    first = complete_http(http, "keep-pin")["choices"][0]["text"]
    assert upload(http, "keep-pin", peft_dirs["b"]).json()["replaced"]
    info = http.get("/admin/adapters/keep-pin", headers=AUTH).json()
    assert (info["pinned"], info["residency"], info["rank"]) == (True, "device", 8) and server.call(pinned_slot)
    assert complete_http(http, "keep-pin")["choices"][0]["text"] != first  # the new weights, pinned
    assert http.delete("/admin/adapters/keep-pin", headers=AUTH).status_code == 200


def test_admin_calls_racing_a_delete_get_2xx_or_404(http, server, peft_dirs):
    """unload, load and GET racing a DELETE of the same adapter: each is answered 2xx or 404, and the server keeps
    serving (an unload whose adapter was deleted between its two engine calls was a 500 that reset the
    connection)."""
    calls = [("DELETE", ""), ("POST", "/unload"), ("POST", "/load"), ("GET", ""), ("POST", "/unload")]
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        for _ in range(8):
            assert upload(http, "racer", peft_dirs["a"]).status_code in (200, 201)
            futures = [pool.submit(httpx.request, method, f"{server.url}/admin/adapters/racer{path}", headers=AUTH,
                                   timeout=60) for method, path in calls]  # fmt: skip
            statuses = [f.result().status_code for f in futures]
            assert all(s < 300 or s == 404 for s in statuses), statuses
            http.delete("/admin/adapters/racer", headers=AUTH)
    assert complete_http(http, server.state.model_name)["usage"]["completion_tokens"] == 3


def test_admin_archive_upload(http, server, base, peft_dirs):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(peft_dirs["x"], arcname="my-adapter")
    r = http.post("/admin/adapters/from-tar", files={"archive": ("x.tar.gz", buf.getvalue())}, headers=AUTH)
    assert r.status_code == 201 and r.json()["rank"] == 4, r.text
    r = http.post(
        "/admin/adapters/raw-tar", content=buf.getvalue(), headers=AUTH | {"Content-Type": "application/gzip"}
    )
    assert r.status_code == 201 and r.json()["rank"] == 4, r.text
    texts = {m: complete_http(http, m)["choices"][0]["text"] for m in ("from-tar", "raw-tar", base)}
    assert texts["from-tar"] == texts["raw-tar"] != texts[base]
    assert sorted(server.state.store.list()) == ["from-tar", "raw-tar"]
    for name in ("from-tar", "raw-tar"):
        assert http.delete(f"/admin/adapters/{name}", headers=AUTH).status_code == 200
    assert server.state.store.list() == []


def test_admin_refusals_leave_the_store_unchanged(http, server, base, peft_dirs):
    assert upload(http, "keep", peft_dirs["a"]).status_code == 201
    kept = complete_http(http, "keep")["choices"][0]["text"]
    before = server.state.store.list()
    listed = http.get("/admin/adapters", headers=AUTH).json()["data"]
    cfg, st = (peft_dirs["a"] / "adapter_config.json").read_bytes(), (peft_dirs["a"] / "adapter_model.safetensors")
    huge = {k: t.double() for k, t in load_file(st).items()}  # finite as float64, infinite in the pools
    next(iter(huge.values()))[0, 0] = 1e300
    huge_files = [("f", ("adapter_config.json", cfg)), ("f", ("adapter_model.safetensors", save(huge)))]
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../adapter_config.json")
        info.size = len(cfg)
        tar.addfile(info, io.BytesIO(cfg))
    cases = [
        (upload(http, "big", peft_dirs["big"]), 400, "maximum LoRA rank 16"),
        (upload(http, "keep", peft_dirs["tiny"]), 400, "do not fit"),  # a failed re-upload keeps the old one
        (upload(http, "bad name!", peft_dirs["a"]), 400, "invalid adapter name"),
        (upload(http, base, peft_dirs["a"]), 409, "base model"),
        (upload(http, "keep", peft_dirs["b"], token="nope"), 401, "invalid admin token"),
        (
            http.post("/admin/adapters/x", files={"f": ("adapter_model.bin", b"\x80\x04pickle")}, headers=AUTH),
            400,
            "pickled",
        ),
        (http.post("/admin/adapters/x", files={"f": ("adapter_config.json", cfg)}, headers=AUTH), 400, "needs both"),
        (http.post("/admin/adapters/keep", files=huge_files, headers=AUTH), 400, "overflow"),
        (
            http.post("/admin/adapters/x", files={"a": ("evil.tar.gz", evil.getvalue())}, headers=AUTH),
            400,
            "parent-relative",
        ),
        (
            http.post(
                "/admin/adapters/x",
                files=[("f", ("adapter_config.json", b"{]")), ("f", ("adapter_model.safetensors", st.read_bytes()))],
                headers=AUTH,
            ),
            400,
            "not valid JSON",
        ),
        (
            http.post(
                "/admin/adapters/x", content=b"\0" * (17 << 20), headers=AUTH | {"Content-Type": "application/zip"}
            ),
            413,
            "larger than",
        ),
        (
            http.post("/admin/adapters/x", content=b"{}", headers=AUTH | {"Content-Type": "application/json"}),
            415,
            "multipart",
        ),
        (http.post("/admin/adapters/x", data={"field": "urlencoded"}, headers=AUTH), 415, "multipart"),
        (
            http.post(
                "/admin/adapters/x",
                content=b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n--b--\r\n',
                headers=AUTH | {"Content-Type": "multipart/form-data; boundary=b"},
            ),
            400,
            "no files",
        ),
    ]
    for r, status, match in cases:
        assert_openai_error(r, status, match)
    assert server.state.store.list() == before == ["keep"]
    assert http.get("/admin/adapters", headers=AUTH).json()["data"] == listed
    assert complete_http(http, "keep")["choices"][0]["text"] == kept  # still the first upload's weights
    assert http.delete("/admin/adapters/keep", headers=AUTH).status_code == 200


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_adapters_client(server, peft_dirs, capsys, monkeypatch):
    monkeypatch.setenv("HOTLORA_ADMIN_TOKEN", TOKEN)
    cli = ["adapters", "--url", server.url]
    assert cli_main([*cli, "upload", "cli-a", str(peft_dirs["a"])]) == 0
    uploaded = json.loads(capsys.readouterr().out)
    assert (uploaded["name"], uploaded["rank"]) == ("cli-a", 4)
    assert "cli-a" in server.state.store.list()
    assert cli_main([*cli, "list"]) == 0
    assert "cli-a" in capsys.readouterr().out
    assert cli_main([*cli, "delete", "cli-a"]) == 0
    assert "cli-a" not in server.state.store.list()
    capsys.readouterr()
    assert cli_main([*cli, "delete", "cli-a"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli_main([*cli, "--token", "wrong", "list"]) == 1
    assert "invalid admin token" in capsys.readouterr().err
