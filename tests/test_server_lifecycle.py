"""Server start-up on the real engine: the loading phase, a model that fails to load; the serve flags."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from server_harness import AUTH, ServerThread, assert_openai_error, server_settings, until


def test_loading_then_ready_without_tokenizer_or_admin(tmp_path, hotlora_cache, default_model_dir):
    """A second server: the default weights without tokenizer files, no admin token. The real engine
    is built only once `gate` opens, so the loading phase can be observed for as long as needed."""
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for f in default_model_dir.iterdir():
        if not f.name.startswith(("tokenizer", "chat_template")):
            (model / f.name).symlink_to(f)
    settings = server_settings(tmp_path / "store", hotlora_cache, admin_token=None, model=str(model), max_loras=1)
    gate = threading.Event()

    def gated_engine():
        from hotlora.server.engine.engine import LLMEngine

        gate.wait(60)
        return LLMEngine(settings.engine)

    srv = ServerThread(settings, engine_factory=gated_engine)
    srv.thread.start()
    try:
        until(lambda: srv.server.started, what="uvicorn started")
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
        r = httpx.get(srv.url + "/ready")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = httpx.post(srv.url + "/v1/completions", json={"model": "any", "prompt": [1]})
        assert_openai_error(r, 503, "still loading")
        assert r.headers["retry-after"] == "5"
        gate.set()
        ready = until(lambda: (r := httpx.get(srv.url + "/ready")).status_code == 200 and r, what="ready")
        name = ready.json()["model"]
        assert name == srv.state.model_name and name
        assert_openai_error(httpx.get(srv.url + "/admin/adapters", headers=AUTH), 403, "HOTLORA_ADMIN_TOKEN")
        r = httpx.post(srv.url + "/v1/completions", json={"model": name, "prompt": "text", "max_tokens": 1})
        assert_openai_error(r, 400, "no tokenizer")
        r = httpx.post(
            srv.url + "/v1/completions", json={"model": name, "prompt": [1, 2, 3], "max_tokens": 2}, timeout=60
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                                   "prompt_tokens_details": {"cached_tokens": 0}}
        for extra in ({"echo": True}, {"echo": True, "stream": True}):  # the ids have no text to echo: not a 500
            r = httpx.post(srv.url + "/v1/completions", json={"model": name, "prompt": [1, 2], "max_tokens": 1} | extra)
            assert_openai_error(r, 400, "no tokenizer")
        assert srv.call(srv.engine.stats).kv_blocks_used == 0
    finally:
        gate.set()
        srv.stop()


def test_engine_that_fails_to_load_is_reported(tmp_path, hotlora_cache):
    missing = tmp_path / "no-such-model"
    srv = ServerThread(server_settings(tmp_path / "store", hotlora_cache, model=str(missing)))
    fatal: list[BaseException] = []
    srv.state.on_fatal = fatal.append
    srv.thread.start()
    try:
        until(lambda: fatal, what="the load error")
        assert isinstance(fatal[0], FileNotFoundError) and str(missing) in str(fatal[0])
        r = httpx.get(srv.url + "/ready")
        assert r.status_code == 503 and r.json()["status"].startswith("failed:") and "no such file" in r.text
        r = httpx.post(srv.url + "/v1/completions", json={"model": "x", "prompt": [1]})
        assert_openai_error(r, 503, "failed to load")
        assert_openai_error(httpx.get(srv.url + "/admin/adapters", headers=AUTH), 503, "no such file")
    finally:
        srv.stop()


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


def test_stopping_while_the_model_loads_is_not_a_load_failure(tmp_path, hotlora_cache):
    """SIGTERM during the load (a rollout): the lifespan cancels the start-up watcher, which is not the model
    failing to load (the CLI would exit 1 with an empty message), and the shutdown does not wait for a load that
    cannot take its STOP."""
    settings = server_settings(tmp_path / "store", hotlora_cache)
    gate = threading.Event()

    def never_loads():
        gate.wait(60)
        raise RuntimeError("released")

    srv = ServerThread(settings, engine_factory=never_loads)
    fatal: list[BaseException] = []
    srv.state.on_fatal = fatal.append
    srv.thread.start()
    try:
        until(lambda: srv.server.started, what="uvicorn started")
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 20  # not the 30-s join of a thread still loading
        assert fatal == []
    finally:
        gate.set()


def test_the_http_stack_is_uvicorns_c_one():
    """Every entry point's uvicorn settings (uvicorn_config) find the C HTTP parser and event loop among the
    dependencies, not h11 and asyncio's default loop: the production container had neither."""
    import uvloop
    from fastapi import FastAPI
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from hotlora.server.api.app import uvicorn_config

    config = uvicorn_config(FastAPI())
    config.load()
    assert issubclass(config.http_protocol_class, HttpToolsProtocol)  # with the head bound (http_head.py)
    assert config.get_loop_factory() is uvloop.new_event_loop
