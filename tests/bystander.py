"""What the hardening tests check around every bad request: the server keeps serving other clients.

A Bystander runs, while the bad request is handled, a /health poller (its slowest answer is recorded)
and a greedy stream on an adapter (started before the bad request arrives); afterwards the stream must
have completed with the same text as when it ran alone, ending in [DONE].
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx

PROMPT = "The three primary colors are"
STREAM_TOKENS = 16  # the bystander's stream length in the hardening tests


def stream_body(model: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}


def solo_text(url: str, model: str, max_tokens: int) -> str:
    r = httpx.post(url + "/v1/completions", json=stream_body(model, max_tokens), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def read_sse(lines: Any) -> tuple[list[dict[str, Any]], bool]:
    """The JSON events of an SSE body, and whether it ended with [DONE]."""
    events, done = [], False
    for line in lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        events.append(json.loads(line[6:]))
    return events, done


class Bystander:
    def __init__(self, url: str, model: str, expected: str, max_tokens: int) -> None:
        self.url, self.model, self.expected, self.max_tokens = url, model, expected, max_tokens
        self.slowest_health = 0.0
        self.text = ""
        self.done = False
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._poll, daemon=True),
            threading.Thread(target=self._stream, daemon=True),
        ]

    def _poll(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.is_set():
                t0 = time.monotonic()
                assert http.get("/health").status_code == 200
                self.slowest_health = max(self.slowest_health, time.monotonic() - t0)
                time.sleep(0.02)

    def _stream(self) -> None:
        body = stream_body(self.model, self.max_tokens) | {"stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=120) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                for line in lines:  # the first token: the stream is running
                    if line.startswith("data: "):
                        self.text += json.loads(line[6:])["choices"][0]["text"]
                        break
                self._started.set()
                events, self.done = read_sse(lines)
                self.text += "".join(e["choices"][0]["text"] for e in events if e["choices"])
        except BaseException as exc:
            self.error = exc
        finally:
            self._started.set()

    def __enter__(self) -> Bystander:
        for t in self._threads:
            t.start()
        assert self._started.wait(60), "the bystander stream did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        self._threads[1].join(120)
        self._stop.set()
        self._threads[0].join(30)
        if exc[0] is None:
            self.check()

    def check(self) -> None:
        assert self.error is None, self.error
        assert self.done and self.text == self.expected, (self.text, self.expected)
        assert self.slowest_health < 1.0, f"/health took {self.slowest_health:.2f} s"
