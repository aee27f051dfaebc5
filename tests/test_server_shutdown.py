"""A clean shutdown (issue 9, class 6), on a real `hotlora serve` process: SIGTERM makes /ready answer
503 and refuses new work, lets a short stream finish normally, ends a long one with an OpenAI-shaped
error event and [DONE] once the grace period is over, and the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
from bystander import read_sse, stream_body
from server_harness import free_port, until

GRACE_S = 5.0


def _stream(url: str, max_tokens: int, result: dict, started: threading.Event) -> None:
    body = stream_body("default", max_tokens) | {"stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        result["status"] = r.status_code
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                result["first"] = json.loads(line[6:])
                break
        started.set()
        result["events"], result["done"] = read_sse(lines)


def test_sigterm_drains_then_exits_0(tmp_path, hotlora_cache):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "hotlora.server.cli",
        "serve",
        "--quant",
        "none",
        "--port",
        str(port),
        "--max-model-len",
        "512",
        "--kv-cache-memory",
        "0.25",
        "--adapter-dir",
        str(tmp_path / "store"),
        "--served-model-name",
        "default",
        "--shutdown-grace-s",
        str(GRACE_S),
        "--log-level",
        "warning",
    ]
    env = os.environ | {"HOTLORA_CACHE_DIR": str(hotlora_cache)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        until(lambda: _ready(url), timeout=300, what="the server ready")
        short, long_ = {}, {}
        events = [threading.Event(), threading.Event()]
        threads = [
            threading.Thread(target=_stream, args=(url, n, res, ev), daemon=True)
            for n, res, ev in ((4, short, events[0]), (480, long_, events[1]))
        ]
        for t in threads:
            t.start()
        assert all(ev.wait(120) for ev in events)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        until(lambda: httpx.get(url + "/ready").status_code == 503, timeout=1, what="/ready 503")
        r = httpx.post(url + "/v1/completions", json=stream_body("default", 1))
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        for t in threads:
            t.join(60)
        assert short["done"] and short["events"][-1]["choices"][0]["finish_reason"] == "length", short
        assert "error" not in short["events"][-1]
        assert long_["done"] and long_["events"][-1]["error"]["code"] == "shutting_down"
        assert time.monotonic() - sent >= GRACE_S - 0.5  # the long stream got its grace period
        assert proc.wait(60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
