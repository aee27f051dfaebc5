"""The HTTP API on a real uvicorn server over the real engine (the default model, --quant none): OpenAI
shapes and errors, SSE, overload, disconnects, metrics. The admin routes and their CLI client are in
test_server_admin.py, start-up and the serve flags in test_server_lifecycle.py."""

from __future__ import annotations

import contextlib
import json
import socket

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import (
    ServerThread,
    assert_openai_error,
    complete_http,
    server_settings,
    until,
    wait_idle,
)

PROMPT = "The three primary colors are"
GREEDY = {"temperature": 0, "ignore_eos": True}
LONG = 400  # tokens: a sequence this long only ends within a test if it is aborted (no "length" finish)
MAX_RUNNING, MAX_WAITING = 2, 4  # n=2 x 2 prompts may all queue before a step admits them


@pytest.fixture(scope="module")
def server(tmp_path_factory, hotlora_cache):
    settings = server_settings(
        tmp_path_factory.mktemp("store"),
        hotlora_cache,
        max_upload_bytes=16 << 20,
        max_loras=2,
        max_num_seqs=MAX_RUNNING,
        max_waiting=MAX_WAITING,
        num_kv_blocks=64,
    )
    srv = ServerThread(settings).start()
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def stats(server: ServerThread):
    return server.call(server.engine.stats)


def scrape(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = http.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def finished_by_length(http: httpx.Client) -> float:
    return scrape(http).get(("hotlora_request_success_total", (("finished_reason", "length"),)), 0.0)


def aborted_and_tokens(http: httpx.Client) -> tuple[float, float, float]:
    """(requests ended by an abort, prompt tokens, generated tokens) on /metrics."""
    m = scrape(http)
    return (m.get(("hotlora_request_success_total", (("finished_reason", "abort"),)), 0.0),
            m[("hotlora_prompt_tokens_total", ())], m[("hotlora_generation_tokens_total", ())])  # fmt: skip


def assert_one_abort_counted(http: httpx.Client, before: tuple[float, float, float]) -> None:
    """A request the client left is counted as it ends: an abort, with its prompt and the tokens it got."""
    aborts, prompt, generated = aborted_and_tokens(http)
    assert aborts == before[0] + 1 and prompt > before[1] and generated > before[2], (before, aborts, prompt)


def long_body(model: str, stream: bool) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": LONG, "stream": stream, **GREEDY}


# --- OpenAI routes ---------------------------------------------------------------------------------


def test_completions_n_and_prompt_batches_with_the_openai_client(client, server, base):
    tok = server.state.tokenizer
    p1, p2 = tok.encode(PROMPT), tok.encode("Two plus two equals")
    r = client.completions.create(model=base, prompt=[p1, p2], max_tokens=3, n=2, extra_body=GREEDY)
    by = {c.index: c for c in r.choices}
    assert sorted(by) == [0, 1, 2, 3] and all(c.finish_reason == "length" for c in r.choices)
    assert by[0].text == by[1].text and by[2].text == by[3].text, "greedy samples of one prompt agree"
    assert by[0].text != by[2].text and by[0].text.strip()
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(p1) + len(p2), 12)
    assert r.usage.total_tokens == len(p1) + len(p2) + 12
    assert client.completions.create(model=base, prompt=PROMPT, max_tokens=3, extra_body=GREEDY).choices[0].text == (
        by[0].text
    ), "a text prompt is tokenized as the tokenizer does"
    chunks = list(
        client.completions.create(
            model=base, prompt=p1, max_tokens=3, stream=True, stream_options={"include_usage": True}, extra_body=GREEDY
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == by[0].text
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(p1), 3)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt=[1], max_tokens=1)


def test_continuous_usage_stats_puts_the_usage_so_far_in_every_chunk(http, base):
    """vLLM's stream_options.continuous_usage_stats (with include_usage): accepted, so it must be honoured."""
    body = {"model": base, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, **GREEDY}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(line) for line in lines]
    generated = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content") != ""]
    assert len(generated) == 3 and chunks[-1]["choices"] == []
    assert [c["usage"]["completion_tokens"] for c in generated] == [1, 2, 3]
    assert generated[-1]["usage"] == chunks[-1]["usage"] and chunks[-1]["usage"]["prompt_tokens"] > 0


def test_stream_options_without_stream_are_400(http, base):
    """OpenAI and vLLM refuse stream_options on a request that does not stream, rather than ignoring them."""
    for route, fields in (("/v1/completions", {"prompt": "Hi"}),
                          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
        r = http.post(route, json={"model": base, "max_tokens": 1, "stream_options": {"include_usage": True}} | fields)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "stream_options" in err["message"] + (err["param"] or ""), err


def test_logprob_bytes_rebuild_a_character_split_over_tokens(server):
    """OpenAI's `bytes`: the token's own UTF-8 bytes, so that joining them rebuilds a character that the
    tokenizer split over several tokens (each of which decodes to U+FFFD alone)."""
    from hotlora.server.api.logprobs import chat_logprobs
    from hotlora.server.engine.types import TokenLogprob

    text = "🎉 ok"
    ids = server.state.tokenizer.encode(text, add_special_tokens=False)
    entries = chat_logprobs(server.state, [TokenLogprob(i, -1.0) for i in ids])["content"]
    assert any(e["token"] == "\ufffd" for e in entries), entries  # the emoji is split over tokens
    assert bytes(b for e in entries for b in e["bytes"]) == text.encode()


def test_http_methods_outside_the_standard_ones_share_one_metrics_label(tmp_path, hotlora_cache):
    """uvicorn's h11 parser (used where httptools is not installed: it is not a dependency) passes any method token
    through, and each distinct one was a hotlora_http_requests series kept forever. The app, driven in-process."""
    import asyncio

    from hotlora.server.api.app import create_app

    app = create_app(server_settings(tmp_path, hotlora_cache))

    async def send() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            return [(await c.request(m, "/v1/models")).status_code for m in ("FOO1", "FOO2", "PROPFIND")]

    assert asyncio.run(send()) == [405, 405, 405]
    methods = {s.labels["method"] for m in app.state.hotlora.metrics.http.collect() for s in m.samples}
    assert methods == {"OTHER"}, methods


def test_sse_wire_format(http, base):
    expected = complete_http(http, base, max_tokens=2)["choices"][0]["text"]
    body = {"model": base, "prompt": PROMPT, "max_tokens": 2, "stream": True, **GREEDY}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw[: -len("\n\n")].split("\n\n")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_overload_is_429(http, server, base):
    """max_num_seqs sequences run, max_waiting wait: the next request is refused with 429."""
    wait_idle(server)
    with contextlib.ExitStack() as streams:
        for _ in range(MAX_RUNNING + MAX_WAITING):
            assert streams.enter_context(http.stream("POST", "/v1/completions", json=long_body(base, True))).is_success
        full = until(lambda: (s := stats(server)).num_running == MAX_RUNNING and s.num_waiting == MAX_WAITING and s)
        assert full.kv_blocks_used > 0
        r = http.post("/v1/completions", json={"model": base, "prompt": PROMPT, "max_tokens": 1})
        assert_openai_error(r, 429, "overloaded")
        assert r.headers["retry-after"] == "1"
    wait_idle(server)  # every stream closed: each of them aborted, its KV blocks freed
    assert complete_http(http, base, max_tokens=1)["usage"]["completion_tokens"] == 1  # serving again


def test_stream_disconnect_aborts_and_frees_kv_blocks(http, server, base):
    wait_idle(server)
    before, counts = finished_by_length(http), aborted_and_tokens(http)
    with http.stream("POST", "/v1/completions", json=long_body(base, True)) as r:
        lines = r.iter_lines()  # held: dropping the iterator closes the connection
        first = next(line for line in lines if line.startswith("data: {"))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        running = stats(server)
        assert running.num_running == 1 and running.kv_blocks_used > 0, running
    wait_idle(server, timeout=10)
    assert finished_by_length(http) == before, "the sequence ran to its end instead of being aborted"
    assert_one_abort_counted(http, counts)


def test_non_stream_disconnect_aborts_and_frees_kv_blocks(server, http, base):
    """A client that closes its connection while a non-streamed answer is computed: the sequence is aborted and
    its blocks freed. The socket is closed by hand once the sequence runs (a client timeout raced a loaded CPU)."""
    wait_idle(server)
    before, counts = finished_by_length(http), aborted_and_tokens(http)
    body = json.dumps(long_body(base, False)).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        running = until(lambda: (s := stats(server)).num_running == 1 and s, timeout=30)
        assert running.kv_blocks_used > 0
    wait_idle(server, timeout=30)
    assert finished_by_length(http) == before, "the sequence ran to its end instead of being aborted"
    until(lambda: aborted_and_tokens(http)[0] > counts[0], timeout=5)  # noticed at the next disconnect poll
    assert_one_abort_counted(http, counts)


def test_metrics_exposition(http, server, base):
    wait_idle(server)
    ok = ("hotlora_http_requests_total", (("method", "POST"), ("route", "/v1/completions"), ("status", "200")))
    denied = (
        "hotlora_http_requests_total",
        (("method", "GET"), ("route", "/admin/adapters/{name}"), ("status", "401")),
    )
    ttft = ("hotlora_time_to_first_token_seconds_count", ())
    before = scrape(http)
    complete_http(http, base, max_tokens=2)
    assert http.get("/admin/adapters/some-name").status_code == 401
    after = scrape(http)
    assert after[ok] == before.get(ok, 0) + 1 and after[denied] == before.get(denied, 0) + 1
    assert after[ttft] == before[ttft] + 1
    assert after[("hotlora_generation_tokens_total", ())] == before[("hotlora_generation_tokens_total", ())] + 2
    assert after[("hotlora_ready", ())] == 1.0 and after[("hotlora_kv_cache_blocks_total", ())] == 64
    assert after[("hotlora_kv_cache_blocks_used", ())] == 0 and after[("vllm:num_requests_running", ())] == 0
    text = http.get("/metrics").text
    assert 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in text


def test_step_phase_metrics(http, server, base):
    """Every model step lands once in each phase's histogram (server/engine/steptimer.py), its tokens in
    hotlora_step_tokens."""
    from hotlora.server.engine.steptimer import PHASES

    def steps(s) -> int:
        return s.num_eager_steps + s.num_graph_steps

    def phase(m: dict, sample: str, name: str) -> float:
        return m.get((f"hotlora_step_phase_seconds_{sample}", (("phase", name),)), 0.0)

    stats_before, before = wait_idle(server), scrape(http)
    prompts = (PROMPT, [1000 + i for i in range(9)])
    usages = [complete_http(http, base, prompt, max_tokens=4)["usage"] for prompt in prompts]
    stats_after, after = wait_idle(server), scrape(http)
    n = steps(stats_after) - steps(stats_before)
    assert n >= 2 * 4  # at least one step per generated token
    for name in PHASES:
        assert phase(after, "count", name) - phase(before, "count", name) == n, name
        assert phase(after, "sum", name) > phase(before, "sum", name), name  # each phase takes time
        assert after[("hotlora_step_phase_seconds_bucket", (("le", "+Inf"), ("phase", name)))] == phase(
            after, "count", name)
    tokens = after[("hotlora_step_tokens_sum", ())] - before.get(("hotlora_step_tokens_sum", ()), 0.0)
    # the prompt tokens not found in the prefix cache, then every generated token but the last is fed back
    assert tokens == sum(u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"]
                         + u["completion_tokens"] - 1 for u in usages)  # fmt: skip
    assert after[("hotlora_step_tokens_count", ())] - before.get(("hotlora_step_tokens_count", ()), 0.0) == n


def test_idle_connections_outlive_the_clients_pool(server):
    """A client reusing a pooled connection never races the server closing it: the server keeps idle
    connections open longer than httpx and the openai client keep them (a CI failure, stop 14)."""
    from openai._constants import DEFAULT_CONNECTION_LIMITS

    client_expiry = max(DEFAULT_CONNECTION_LIMITS.keepalive_expiry, httpx.Limits().keepalive_expiry or 0)
    assert server.server.config.timeout_keep_alive >= 10 * client_expiry


def test_priority_needs_the_priority_scheduling_policy(http, base):
    """vLLM's per-request priority: on a first come, first served server only the default (0) is taken."""
    body = {"model": base, "prompt": "hi", "max_tokens": 1}
    for priority in (1, -1):
        err = assert_openai_error(http.post("/v1/completions", json=body | {"priority": priority}), 400,
                                  "--scheduling-policy priority")
        assert err["param"] == "priority"
    assert_openai_error(http.post("/v1/completions", json=body | {"priority": True}), 400, "priority")
    assert http.post("/v1/completions", json=body | {"priority": 0}).status_code == 200
