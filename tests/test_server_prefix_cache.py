"""Prefix caching seen through the HTTP API of a real server: usage.prompt_tokens_details.cached_tokens
and vLLM's prefix-cache counters on /metrics."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import ServerThread, server_settings

PROMPT = list(range(1000, 1040))  # 40 token ids: two whole blocks of 16 can be reused, the rest is computed
BODY = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "ignore_eos": True}


def _counters(http: httpx.Client) -> dict[str, float]:
    families = text_string_to_metric_families(http.get("/metrics").text)
    return {s.name: s.value for f in families for s in f.samples if "prefix_cache" in s.name}


def _streamed_usage(http: httpx.Client, model: str) -> dict:
    body = BODY | {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return chunks[-1]["usage"]


def test_cached_tokens_in_usage_and_metrics(tmp_path, hotlora_cache):
    srv = ServerThread(server_settings(tmp_path / "store", hotlora_cache)).start()
    try:
        model = srv.state.model_name
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            first = http.post("/v1/completions", json=BODY | {"model": model}).json()
            second = http.post("/v1/completions", json=BODY | {"model": model}).json()
            streamed = _streamed_usage(http, model)
            counters = _counters(http)
    finally:
        srv.stop()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert streamed["prompt_tokens_details"] == {"cached_tokens": 32} and streamed["prompt_tokens"] == 40
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    for name in ("vllm:prefix_cache", "hotlora_prefix_cache"):
        assert counters[f"{name}_queries_total"] == 3 * 40 and counters[f"{name}_hits_total"] == 2 * 32


def test_prefix_caching_flag_and_env(monkeypatch):
    from hotlora.server.cli import build_parser, engine_config

    def parsed(*argv: str) -> bool:
        return engine_config(build_parser().parse_args(["serve", *argv])).enable_prefix_caching

    assert parsed() and not parsed("--no-enable-prefix-caching") and parsed("--enable-prefix-caching")
    monkeypatch.setenv("HOTLORA_ENABLE_PREFIX_CACHING", "false")
    assert not parsed() and parsed("--enable-prefix-caching")
    monkeypatch.setenv("HOTLORA_ENABLE_PREFIX_CACHING", "maybe")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])
