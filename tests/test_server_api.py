"""The HTTP API on a real uvicorn server over a fake engine (fast): shapes, errors, auth, admin, CLI."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from lora_factory import save_adapter, tiny_llama
from server_harness import ServerThread

from hotlora.server.api.state import ServerSettings
from hotlora.server.cli import main as cli_main
from hotlora.server.engine.config import EngineConfig

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory) -> dict[str, Path]:
    base, root = tiny_llama(), tmp_path_factory.mktemp("peft")
    return {
        "a": save_adapter(base, root / "a", seed=1),
        "b": save_adapter(base, root / "b", seed=2, r=8),
        "big": save_adapter(base, root / "big", seed=3, r=32),
    }


@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    return FakeEngine(step_delay=0.02, max_waiting=6)


@pytest.fixture(scope="module")
def server(tmp_path_factory, fake):
    settings = ServerSettings(
        EngineConfig(adapter_dir=tmp_path_factory.mktemp("store"), max_lora_rank=16),
        admin_token=TOKEN,
        max_upload_bytes=1 << 20,
    )
    srv = ServerThread(settings, engine_factory=lambda: fake).start()
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def assert_openai_error(r: httpx.Response, status: int, match: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    assert match.lower() in err["message"].lower(), err["message"]
    return err


def upload(http, name: str, folder: Path, token: str = TOKEN) -> httpx.Response:
    files = [("files", (n, (folder / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    return http.post(f"/admin/adapters/{name}", files=files, headers={"Authorization": f"Bearer {token}"})


def until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def test_loading_then_ready(tmp_path):
    gate = threading.Event()

    def slow_factory():
        gate.wait(30)
        return FakeEngine()

    srv = ServerThread(ServerSettings(EngineConfig(adapter_dir=tmp_path)), engine_factory=slow_factory)
    srv.thread.start()
    try:
        until(lambda: srv.server.started)
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/ready").json() == {"status": "loading"}
        r = httpx.post(srv.url + "/v1/completions", json={"model": "fake-base", "prompt": [1]})
        assert_openai_error(r, 503, "still loading")
        gate.set()
        until(lambda: httpx.get(srv.url + "/ready").status_code == 200)
    finally:
        gate.set()
        srv.stop()


def test_engine_that_fails_to_load_is_reported(tmp_path):
    def broken():
        raise RuntimeError("weights are missing")

    srv = ServerThread(ServerSettings(EngineConfig(adapter_dir=tmp_path)), engine_factory=broken)
    fatal = []
    srv.state.on_fatal = fatal.append
    srv.thread.start()
    try:
        until(lambda: fatal)
        assert "weights are missing" in str(fatal[0])
        r = httpx.get(srv.url + "/ready")
        assert r.status_code == 503 and "weights are missing" in r.json()["status"]
    finally:
        srv.stop()


def test_admin_disabled_without_token(tmp_path):
    srv = ServerThread(ServerSettings(EngineConfig(adapter_dir=tmp_path)), engine_factory=FakeEngine).start()
    try:
        r = httpx.get(srv.url + "/admin/adapters", headers=AUTH)
        assert_openai_error(r, 403, "HOTLORA_ADMIN_TOKEN")
    finally:
        srv.stop()


def test_admin_auth(http):
    assert_openai_error(http.get("/admin/adapters"), 401, "missing bearer token")
    r = http.get("/admin/adapters", headers={"Authorization": "Bearer wrong"})
    assert_openai_error(r, 401, "invalid admin token")
    assert r.headers["www-authenticate"] == "Bearer"
    assert http.get("/admin/adapters", headers=AUTH).status_code == 200


def test_completions_n_and_prompt_batches_with_the_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.completions.create(model="fake-base", prompt=[[1, 2], [3, 4, 5]], max_tokens=2, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert all(c.text == "t1 t2 " and c.finish_reason == "length" for c in r.choices)
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 8 and r.usage.total_tokens == 13
    chunks = list(
        client.completions.create(
            model="fake-base", prompt=[1], max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "t1 t2 t3 "
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 3
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=[1], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="no tokenizer"):
        client.completions.create(model="fake-base", prompt="text needs a tokenizer", max_tokens=1)


def test_sse_wire_format(http):
    with http.stream(
        "POST", "/v1/completions", json={"model": "fake-base", "prompt": [1], "max_tokens": 2, "stream": True}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    body = json.loads(lines[0][6:])
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "t1 "


def test_overload_is_429(http, fake):
    streams = []
    try:
        for _ in range(fake.max_waiting):
            cm = http.stream(
                "POST",
                "/v1/completions",
                json={"model": "fake-base", "prompt": [1], "max_tokens": 10_000, "stream": True},
            )
            streams.append((cm, cm.__enter__()))
        assert [r.status_code for _, r in streams] == [200] * fake.max_waiting
        r = http.post("/v1/completions", json={"model": "fake-base", "prompt": [1], "max_tokens": 1})
        assert_openai_error(r, 429, "overloaded")
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
    until(lambda: not fake.seqs)


def test_stream_disconnect_aborts(http, fake):
    with http.stream(
        "POST", "/v1/completions", json={"model": "fake-base", "prompt": [1], "max_tokens": 10_000, "stream": True}
    ) as r:
        next(r.iter_lines())
        (rid,) = list(fake.seqs)
    until(lambda: rid in fake.aborted and not fake.seqs)


def test_non_stream_disconnect_aborts(server, fake):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/completions",
            json={"model": "fake-base", "prompt": [1], "max_tokens": 10_000},
            timeout=0.5,
        )
    until(lambda: not fake.seqs)
    assert fake.aborted


def test_metrics_exposition(http):
    text = http.get("/metrics").text
    assert 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in text
    assert "hotlora_time_to_first_token_seconds_count" in text and "hotlora_ready 1.0" in text
    assert 'hotlora_http_requests_total{method="POST",route="/v1/completions",status="200"}' in text
    assert 'hotlora_http_requests_total{method="GET",route="/admin/adapters",status="401"}' in text


def test_admin_upload_list_delete(http, server, peft_dirs):
    assert upload(http, "task-a", peft_dirs["a"]).status_code == 201
    r = upload(http, "task-a", peft_dirs["b"])
    assert r.status_code == 200 and r.json()["replaced"] and r.json()["rank"] == 8
    assert [a["name"] for a in http.get("/admin/adapters", headers=AUTH).json()["data"]] == ["task-a"]
    assert http.get("/admin/adapters/task-a", headers=AUTH).json()["name"] == "task-a"
    models = http.get("/v1/models").json()["data"]
    assert {"id": "task-a", "parent": "fake-base"}.items() <= models[1].items()
    assert http.post("/v1/completions", json={"model": "task-a", "prompt": [1], "max_tokens": 1}).status_code == 200
    assert http.post("/admin/adapters/task-a/load", headers=AUTH).status_code == 200
    assert http.delete("/admin/adapters/task-a", headers=AUTH).json()["deleted"]
    assert_openai_error(http.delete("/admin/adapters/task-a", headers=AUTH), 404)
    assert_openai_error(http.get("/admin/adapters/task-a", headers=AUTH), 404)
    assert_openai_error(http.post("/admin/adapters/task-a/load", headers=AUTH), 404)
    r = http.post("/v1/completions", json={"model": "task-a", "prompt": [1], "max_tokens": 1})
    assert_openai_error(r, 404, "does not exist")
    assert server.state.store.list() == []


def test_admin_archive_upload(http, peft_dirs):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(peft_dirs["a"], arcname="my-adapter")
    r = http.post("/admin/adapters/from-tar", files={"archive": ("a.tar.gz", buf.getvalue())}, headers=AUTH)
    assert r.status_code == 201, r.text
    r = http.post(
        "/admin/adapters/raw-tar", content=buf.getvalue(), headers=AUTH | {"Content-Type": "application/gzip"}
    )
    assert r.status_code == 201, r.text
    for name in ("from-tar", "raw-tar"):
        http.delete(f"/admin/adapters/{name}", headers=AUTH)


def test_admin_refusals_leave_the_store_unchanged(http, server, peft_dirs):
    assert upload(http, "keep", peft_dirs["a"]).status_code == 201
    before = server.state.store.list()
    cfg, st = (peft_dirs["a"] / "adapter_config.json").read_bytes(), (peft_dirs["a"] / "adapter_model.safetensors")
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../adapter_config.json")
        info.size = len(cfg)
        tar.addfile(info, io.BytesIO(cfg))
    cases = [
        (upload(http, "big", peft_dirs["big"]), 400, "maximum LoRA rank 16"),
        (upload(http, "bad name!", peft_dirs["a"]), 400, "invalid adapter name"),
        (upload(http, "fake-base", peft_dirs["a"]), 409, "base model"),
        (upload(http, "keep", peft_dirs["b"], token="nope"), 401, "invalid admin token"),
        (
            http.post("/admin/adapters/x", files={"f": ("adapter_model.bin", b"\x80\x04pickle")}, headers=AUTH),
            400,
            "pickled",
        ),
        (http.post("/admin/adapters/x", files={"f": ("adapter_config.json", cfg)}, headers=AUTH), 400, "needs both"),
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
                "/admin/adapters/x", content=b"\0" * (2 << 20), headers=AUTH | {"Content-Type": "application/zip"}
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
    assert server.state.store.list() == before
    assert [a["name"] for a in http.get("/admin/adapters", headers=AUTH).json()["data"]] == before
    assert http.post("/v1/completions", json={"model": "keep", "prompt": [1], "max_tokens": 1}).status_code == 200
    http.delete("/admin/adapters/keep", headers=AUTH)


def test_cli_adapters_client(server, peft_dirs, capsys, monkeypatch):
    monkeypatch.setenv("HOTLORA_ADMIN_TOKEN", TOKEN)
    base = ["adapters", "--url", server.url]
    assert cli_main([*base, "upload", "cli-a", str(peft_dirs["a"])]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "cli-a"
    assert cli_main([*base, "list"]) == 0
    assert "cli-a" in capsys.readouterr().out
    assert cli_main([*base, "delete", "cli-a"]) == 0
    assert cli_main([*base, "delete", "cli-a"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli_main([*base, "--token", "wrong", "list"]) == 1


def test_cli_serve_flags_and_env(monkeypatch):
    from hotlora.server.cli import build_parser, engine_config, parse_size

    monkeypatch.setenv("HOTLORA_MAX_LORAS", "3")
    monkeypatch.setenv("HOTLORA_ADAPTER_DIR", "/tmp/adapters-env")
    args = build_parser().parse_args(["serve", "--quant", "none", "--max-lora-rank", "32", "--port", "9000"])
    cfg = engine_config(args)
    assert (cfg.max_loras, cfg.max_lora_rank, cfg.quant, str(cfg.adapter_dir)) == (3, 32, "none", "/tmp/adapters-env")
    assert args.port == 9000 and args.host == "127.0.0.1"
    assert parse_size("2GiB") == 2 << 30 and parse_size("512M") == 512 << 20 and parse_size("100") == 100
    monkeypatch.setenv("HOTLORA_QUANT", "int3")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])
