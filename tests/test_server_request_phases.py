"""vLLM's request-phase histograms on /metrics of a real server (the default model, one sequence at a time):
one observation per finished request, TTFT = queue + prefill + delivery, queue + prefill within the TTFT
that the client measures, and queue time that grows when requests must wait for each other."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import ServerThread, server_settings, wait_idle

PARTS = ("vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
         "hotlora_request_first_token_delivery_seconds")  # fmt: skip
PHASES = (*PARTS, "vllm:request_decode_time_seconds", "vllm:request_inference_time_seconds",
          "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
          "hotlora_time_to_first_token_seconds")  # fmt: skip
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory, hotlora_cache):
    srv = ServerThread(server_settings(tmp_path_factory.mktemp("store"), hotlora_cache, max_num_seqs=1)).start()
    yield srv
    srv.stop()


def _sums(url: str) -> dict[str, float]:
    """{family_sum / family_count: value} of the phase histograms, and the finished requests."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if family.name in PHASES and s.name.endswith(("_sum", "_count")):
                out[s.name] = s.value
            elif s.name == "hotlora_request_success_total":
                out["finished"] = out.get("finished", 0.0) + s.value
    return out


def _stream(url: str, model: str, prompt: list[int]) -> float:
    """Stream a greedy completion; the client's time to its first text chunk (seconds)."""
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True}
    start, ttft = time.monotonic(), 0.0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and not ttft and json.loads(line[6:])["choices"][0]["text"]:
                ttft = time.monotonic() - start
    assert ttft > 0
    return ttft


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _check_counts_and_parts(d: dict[str, float], n: int, client_ttft: float) -> None:
    """n finished requests, each observed once in every phase; their parts add up to the server's TTFT and
    fit in the client's (which also holds the HTTP exchange and the tokenization of the body)."""
    assert d["finished"] == n
    for name in PHASES:
        assert d[f"{name}_count"] == n, name
    queue, prefill, delivery = (d[f"{p}_sum"] for p in PARTS)
    assert queue > 0 and prefill > 0 and delivery >= 0
    assert queue + prefill + delivery == pytest.approx(d["hotlora_time_to_first_token_seconds_sum"], abs=1e-6 * n)
    assert queue + prefill <= client_ttft
    assert d["vllm:time_to_first_token_seconds_sum"] == pytest.approx(d["hotlora_time_to_first_token_seconds_sum"])
    decode, inference = d["vllm:request_decode_time_seconds_sum"], d["vllm:request_inference_time_seconds_sum"]
    assert decode > 0 and inference == pytest.approx(prefill + decode, abs=1e-6 * n)


@pytest.mark.timeout(300)
def test_request_phase_histograms(server):
    model = server.state.model_name
    prompts = [[200 + 31 * i + k for k in range(6)] for i in range(6)]  # distinct: no prefix-cache hits
    alone_queue = []
    for prompt in prompts[:3]:  # one at a time: each delta is one request's
        wait_idle(server)
        before = _sums(server.url)
        ttft = _stream(server.url, model, prompt)
        d = _delta(before, _sums(server.url))
        _check_counts_and_parts(d, 1, ttft)
        alone_queue.append(d["vllm:request_queue_time_seconds_sum"])
    wait_idle(server)
    before = _sums(server.url)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # max_num_seqs=1: they run one after another
        ttfts = list(pool.map(lambda p: _stream(server.url, model, p), prompts[3:]))
    d = _delta(before, _sums(server.url))
    _check_counts_and_parts(d, 3, sum(ttfts))
    queue, inference = d["vllm:request_queue_time_seconds_sum"], d["vllm:request_inference_time_seconds_sum"]
    # the second request waits for the first to finish, the third for both: with similar requests the queue
    # times add up to about 2x the first's and 1x the second's inference time, i.e. ~the summed inference time
    assert queue >= 0.5 * inference
    assert queue > 3 * max(alone_queue)
