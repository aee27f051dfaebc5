"""Run a real uvicorn server on loopback in a background thread, for the server tests; and the helpers
that those tests share (settings on the default model, admin uploads, OpenAI error checks, waits)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from hotlora.server.api.app import create_app, uvicorn_config
from hotlora.server.api.state import ServerSettings
from hotlora.server.engine.config import EngineConfig

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PROMPT = "The three primary colors are"
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}  # the openai client's arguments


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, settings: ServerSettings, engine_factory: Any = None) -> None:
        self.app = create_app(settings, engine_factory)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(self.app, graceful_s=5, host="127.0.0.1", port=self.port))
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def state(self) -> Any:
        return self.app.state.hotlora

    @property
    def engine(self) -> Any:
        """The LLMEngine itself: only read it while no request is in flight, or through state.engine.call."""
        return self.state.engine.engine

    def call(self, fn: Any, *args: Any, timeout: float = 60.0) -> Any:
        """Run fn(*args) in the engine thread (between steps) from a test thread."""
        loop = self.state.engine._loop
        return asyncio.run_coroutine_threadsafe(self.state.engine.call(fn, *args), loop).result(timeout)

    def start(self, ready_timeout: float = 600.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.state.engine.error is not None:
                raise RuntimeError(f"engine failed: {self.state.engine.error}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def server_settings(
    adapter_dir: Path, cache: Path, admin_token: str | None = TOKEN, max_upload_bytes: int = 64 << 20, **engine: Any
) -> ServerSettings:
    """The default model unquantized (fast on CPU), small LoRA limits and context; `engine` overrides."""
    fields = dict(
        quant="none",
        cache_dir=cache,
        adapter_dir=adapter_dir,
        max_loras=3,
        max_lora_rank=16,
        max_model_len=512,
        kv_cache_memory=0.25,
    )
    return ServerSettings(EngineConfig(**(fields | engine)), admin_token=admin_token, max_upload_bytes=max_upload_bytes)


def upload(http: httpx.Client, name: str, folder: Path, token: str = TOKEN) -> httpx.Response:
    """POST the two files of a PEFT folder as multipart parts."""
    files = [("files", (n, (folder / n).read_bytes())) for n in ADAPTER_FILES]
    return http.post(f"/admin/adapters/{name}", files=files, headers={"Authorization": f"Bearer {token}"})


def complete(client: Any, model: str, max_tokens: int = 6) -> str:
    """The text of a greedy completion of PROMPT through the openai client."""
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, **GREEDY).choices[0].text


def complete_http(http: httpx.Client, model: str, prompt: str | list[int] = PROMPT, max_tokens: int = 3) -> dict:
    """A greedy /v1/completions over raw HTTP (ignore_eos): the response body, after asserting a 200."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_across_swap(http: httpx.Client, server: ServerThread, model: str, n: int, name: str, folder: Path) -> str:
    """The text of a greedy n-token stream of PROMPT from `model`, during which (after its first chunk) adapter
    `name` is replaced by the upload of `folder`: asserted to be a hot swap while the request still runs."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "stream": True, "temperature": 0, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        swapped = upload(http, name, folder)
        assert swapped.status_code == 200 and swapped.json()["replaced"], swapped.text
        assert server.call(server.engine.stats).num_running == 1, "the request finished before the swap"
        rest = [line for line in lines if line.startswith("data: {")]
    return "".join(json.loads(line[6:])["choices"][0]["text"] for line in [first, *rest])


def assert_openai_error(r: httpx.Response, status: int, match: str = "") -> dict:
    """The response is an OpenAI-shaped error with this status whose message contains `match`."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err
    assert match.lower() in err["message"].lower(), err["message"]
    return err


def until(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll cond() until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached in {timeout} s")


def wait_idle(server: ServerThread, timeout: float = 30.0) -> Any:
    """The engine's stats once nothing runs, waits or holds a KV block."""
    last: list[Any] = []

    def idle() -> Any:
        last[:] = [server.call(server.engine.stats)]
        s = last[0]
        return s if s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_used == 0 else None

    try:
        return until(idle, timeout, "an idle engine")
    except AssertionError:
        raise AssertionError(f"the engine did not go idle: {last[0]}") from None
