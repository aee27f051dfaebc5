"""No request can hurt another (issue 9, classes 1-3): numbers the engine cannot take, invalid Unicode,
and large bodies are refused with OpenAI-shaped 4xx answers, while /health answers within a second and
a stream on an adapter that was running when the bad request arrived completes with its normal output."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time

import httpx
import pytest
from bystander import STREAM_TOKENS, Bystander
from server_harness import ServerThread, assert_openai_error, server_settings

from hotlora.server.engine.types import ErrorKind, Request, SamplingParams

MAX_BODY = 2 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory, peft_dirs, hotlora_cache):
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(peft_dirs["a"], root / "a")
    settings = server_settings(root, hotlora_cache)
    settings.max_body_bytes = MAX_BODY
    srv = ServerThread(settings).start()
    yield srv
    srv.stop()


def bystander(server, expected) -> Bystander:
    return Bystander(server.url, "a", expected, STREAM_TOKENS)


def body(server, **fields) -> dict:
    return {"model": server.state.model_name, "prompt": "Hi", "max_tokens": 2} | fields


# --- 1. numbers -------------------------------------------------------------------------------------


NUMBERS = [
    ({"seed": 2**64 - 1, "n": 2, "temperature": 0.7}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"max_tokens": 2**40}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"n": 17}, "n"),
    ({"top_k": 2**40}, "top_k"),
    ({"stop_token_ids": [2**40]}, "stop_token_ids"),
    ({"prompt": [2**40]}, "prompt"),
    ({"prompt": [[False]]}, "prompt"),
    ({"prompt": [True, 1]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"logit_bias": {str(2**40): 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"1": 1e10}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"min_tokens": 2**40}, "min_tokens"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
]


def test_numbers_the_engine_cannot_take_are_400(server, expected, http):
    with bystander(server, expected):
        for fields, param in NUMBERS:
            err = assert_openai_error(http.post("/v1/completions", json=body(server, **fields)), 400)
            assert (err["param"] or "").split(".")[0] == param, (fields, err)  # the field, as given


def test_a_request_refused_for_one_prompt_runs_and_counts_nothing(server, http):
    """Its other prompts were queued (and ran a step or two, and were counted) before the bad one was refused."""

    def counted() -> tuple:
        s = server.call(server.engine.stats)
        requests = [line for line in http.get("/metrics").text.splitlines()
                    if line.startswith('hotlora_adapter_requests_total{adapter="a"}')]  # fmt: skip
        return s.num_eager_steps + s.num_graph_steps, s.prefix_cache_queries, requests

    before = counted()
    for fields in ({"prompt": [[5] * 40, [10**8]]}, {"prompt": [5] * 40, "n": 3, "logit_bias": {str(10**8): 1}}):
        r = http.post("/v1/completions", json=body(server, model="a", max_tokens=5, **fields))
        assert assert_openai_error(r, 400)["param"] in ("prompt", "logit_bias")
    assert counted() == before
    assert server.call(lambda: server.engine.seqs) == {}


def test_seeds_at_the_int64_edges_work_for_every_choice(server, expected, http):
    with bystander(server, expected):
        for seed in (2**63 - 1, -(2**63)):
            r = http.post("/v1/completions", json=body(server, seed=seed, n=3, temperature=0.7))
            assert r.status_code == 200, r.text
            again = http.post("/v1/completions", json=body(server, seed=seed, n=3, temperature=0.7))
            assert [c["text"] for c in r.json()["choices"]] == [c["text"] for c in again.json()["choices"]]
        r = http.post("/v1/completions", json=body(server, prompt=[server.engine.model_config.vocab_size]))
        assert_openai_error(r, 400, "token ids")
        r = http.post(
            "/v1/completions",
            content=b'{"model": "x", "prompt": "Hi", "temperature": NaN}',
            headers={"content-type": "application/json"},
        )
        assert_openai_error(r, 400, "temperature")


def test_engine_fails_a_request_that_cannot_be_prepared_alone(server, expected):
    """A request past the API's checks whose step preparation raises (a seed torch cannot take) ends
    alone with an error; the stream on the adapter running beside it completes normally."""
    params = SamplingParams(max_tokens=4, temperature=0.7)
    params.seed = 2**70  # as a bug would let through: SamplingParams itself refuses it
    loop = server.state.engine._loop

    async def run() -> list:
        stream = await server.state.engine.add(Request("bad-seed", [1, 2, 3], params))
        return [out async for out in stream]

    with bystander(server, expected):
        outs = asyncio.run_coroutine_threadsafe(run(), loop).result(60)
    assert len(outs) == 1 and outs[0].finished and outs[0].error_kind is ErrorKind.INTERNAL
    assert "could not be prepared" in outs[0].error
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)


# --- 2. Unicode -------------------------------------------------------------------------------------

SURROGATE = "\ud800"


UNICODE = [
    ("completions", {"prompt": SURROGATE}),
    ("completions", {"prompt": ["fine", "x" + SURROGATE]}),
    ("completions", {"stop": [SURROGATE]}),
    ("completions", {"user": SURROGATE}),
    ("completions", {"model": SURROGATE}),
    ("chat", {"messages": [{"role": "user", "content": SURROGATE}]}),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]}),
    ("chat", {"messages": [{"role": "user", "content": "ok", "name": "\udfff"}]}),
    ("completions", {"stop_token_ids": [1, 2], "logit_bias": {"5": 1.0}, "stop": ["é", "\udbff"]}),
    ("completions", {"structured_outputs": {"choice": ["a", SURROGATE]}}),
]


def test_lone_surrogates_are_400(server, expected, http):
    with bystander(server, expected):
        for route, fields in UNICODE:
            chat = {"model": server.state.model_name, "max_tokens": 2}
            base, path = (body(server), "/v1/completions") if route == "completions" else (chat, "/v1/chat/completions")
            # json.dumps escapes the surrogate as \ud800 in the JSON text, which JSON allows
            r = http.post(path, content=json.dumps(base | fields), headers={"content-type": "application/json"})
            assert_openai_error(r, 400, "invalid unicode")
        for depth in (900, 200_000):  # nesting deep enough for a recursive walk, or for the JSON parser
            deep = b'{"model": "m", "prompt": "x", "user": ' + b"[" * depth + b"]" * depth + b"}"
            r = http.post("/v1/completions", content=deep, headers={"content-type": "application/json"})
            assert_openai_error(r, 400)


# --- 3. large bodies ----------------------------------------------------------------------------------


def _raw(server, head: bytes, chunks: list[bytes] = (), pause: float = 0.0) -> tuple[bytes, float]:
    """Send a raw HTTP/1.1 request (headers, then chunks while the server lets us); the response head and
    how long it took to come after the headers."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head)
        t0 = time.monotonic()
        for chunk in chunks:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(pause)
        answer = s.recv(65536)
        took = time.monotonic() - t0
        while more := s.recv(65536):  # the server closes the connection after a 413
            answer += more
        return answer, took


def test_body_above_the_limit_is_413_before_it_is_read(server, expected):
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 104857600\r\n\r\n"
    )
    with bystander(server, expected):
        answer, took = _raw(server, head)  # 100 MB declared, none sent: any answer came before the body
        # waiting for the body would end only at the socket's 30 s timeout; 10 s is a margin for a busy CI host
        assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer and took < 10.0
        chunked = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        piece = b"x" * (256 << 10)
        chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        answer, _ = _raw(server, chunked, [chunk] * 64, pause=0.01)  # 16 MB offered, refused past 2 MiB
        assert answer.startswith(b"HTTP/1.1 413")
    metrics = httpx.get(server.url + "/metrics").text
    assert 'route="/v1/completions",status="413"' in metrics


def test_request_heads_past_the_limit_are_431(server, expected):
    """httptools alone would buffer any amount of request line and headers: the server answers 431 once a head
    passes MAX_HEAD_BYTES, whether it comes in one write or as one endless header; heads under the bound (two 12 KiB
    cookies, twice on one connection) are served, and a body is never counted as head."""
    from hotlora.server.api.limits import MAX_HEAD_BYTES

    get = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    with bystander(server, expected):
        many = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(MAX_HEAD_BYTES // 1000 + 8))
        answer, _ = _raw(server, get + many + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431") and b"request_header_fields_too_large" in answer
        endless = [b"b" * 8192] * 2048  # one header value, 16 MiB offered, 8 KiB a write until the server closes
        answer, _ = _raw(server, get + b"X-Endless: ", endless, pause=0.001)
        assert answer.startswith(b"HTTP/1.1 431")
        ok = b"".join(b"Cookie-%d: %s\r\n" % (i, b"c" * (12 << 10)) for i in range(2))
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:  # each head counts alone
            for _ in range(2):
                s.sendall(get + ok + b"\r\n")
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
            s.sendall(get + many + b"\r\n")  # and the count starts again after each request
            assert s.recv(65536).startswith(b"HTTP/1.1 431")
        # a head whose blank line is split across writes, then a body larger than the bound: the body is no head
        payload = json.dumps(body(server, prompt="Hi " * MAX_HEAD_BYTES)).encode()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
        answer, _ = _raw(server, head[:-1], [b"", head[-1:] + payload], pause=0.05)  # b"": a pause between
        assert answer.startswith(b"HTTP/1.1 400") and b"maximum context length" in answer
    metrics = httpx.get(server.url + "/metrics").text
    assert 'status="431"' not in metrics  # answered by the parser: the app never saw them


def _read_to_close(s: socket.socket) -> bytes:
    out = b""
    try:
        while more := s.recv(65536):
            out += more
    except ConnectionResetError:
        pass
    return out


def test_chunked_framing_and_pipelined_heads_are_bounded(server, expected):
    """A chunked body's endless trailer or chunk extension is a 431 too; a head that passes the bound behind an
    answer still streaming (pipelined) closes the connection after that answer, which arrives whole; and neither
    a pipelined head whose blank line is split across writes nor empty lines before a request line fool the count."""
    from hotlora.server.api.limits import MAX_HEAD_BYTES

    post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    get = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    endless = [b"b" * 8192] * 2048
    with bystander(server, expected):
        for framing in (b"2\r\n{}\r\n0\r\nX-Trailer: ", b"1;ext="):
            answer, _ = _raw(server, post + b"Transfer-Encoding: chunked\r\n\r\n" + framing, endless, pause=0.001)
            assert answer.startswith(b"HTTP/1.1 431") and b"request_header_fields_too_large" in answer
        stream = json.dumps(body(server, max_tokens=32, stream=True)).encode()
        big = get + b"X-Pad: " + b"a" * (2 * MAX_HEAD_BYTES) + b"\r\n\r\n"
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(post + b"Content-Length: %d\r\n\r\n%s" % (len(stream), stream))
            time.sleep(0.3)  # the stream has begun
            s.sendall(big)
            out = _read_to_close(s)
        assert out.count(b"HTTP/1.1 ") == 1 and out.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in out
        whole = json.dumps(body(server, max_tokens=32)).encode()  # and behind an answer not yet begun
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(post + b"Content-Length: %d\r\n\r\n%s" % (len(whole), whole))
            time.sleep(0.2)
            s.sendall(big)
            out = _read_to_close(s)
        assert out.count(b"HTTP/1.1 ") == 1 and out.startswith(b"HTTP/1.1 200") and b'"choices"' in out
        payload = json.dumps(body(server, prompt="Hi " * (MAX_HEAD_BYTES // 2))).encode()
        head = post + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
        answer, _ = _raw(server, get + b"\r\n" + head[:-1], [b"", head[-1:] + payload], pause=0.3)
        assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 400" in answer and b"HTTP/1.1 431" not in answer
        answer, _ = _raw(server, b"\r\n\r\n" + big)
        assert answer.startswith(b"HTTP/1.1 431")


def test_small_chunks_and_pipelined_requests_pass_the_bounds(server, expected):
    """What the bounds must not count: a chunked body of 1-byte chunks (five bytes of framing per byte, all in a
    few reads), and a read that ends a body and holds 30 pipelined requests and a head whose body comes later."""
    from hotlora.server.api.limits import MAX_HEAD_BYTES

    post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with bystander(server, expected):
        payload = json.dumps(body(server, prompt="Hi " * (MAX_HEAD_BYTES // 2))).encode()
        chunks = b"".join(b"1\r\n%s\r\n" % payload[i : i + 1] for i in range(len(payload))) + b"0\r\n\r\n"
        answer, _ = _raw(server, post + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks)
        assert answer.startswith(b"HTTP/1.1 400") and b"maximum context length" in answer
        small = json.dumps(body(server, max_tokens=1)).encode()
        gets = b"".join(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\n\r\n" % (b"p" * 1200) for _ in range(30))
        head = post + b"Content-Length: %d\r\n\r\n" % len(small)
        last = post + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(small)  # its body comes later
        answer, _ = _raw(server, head + small[:5], [b"", small[5:] + gets + last, small], pause=0.2)
        assert answer.count(b"HTTP/1.1 200") == 32 and b"HTTP/1.1 431" not in answer


def test_large_prompts_are_tokenized_off_the_event_loop(server, expected, http):
    chars = server.state.tokenizers.max_chars
    assert chars > 0
    prompt = "lorem ipsum dolor sit amet " * (chars // 27)  # just under the character bound
    prompts = [prompt] * max(1, (MAX_BODY - (256 << 10)) // len(prompt))  # as much as the body limit lets in
    with bystander(server, expected):
        r = http.post("/v1/completions", json=body(server, prompt=prompts))
        assert_openai_error(r, 400, "maximum context length")
        r = http.post("/v1/completions", json=body(server, prompt="x" * (chars + 1)))
        assert_openai_error(r, 400, "characters")
        big = {"role": "user", "content": "hello " * min(chars // 6, MAX_BODY // 8)}
        r = http.post("/v1/chat/completions", json={"model": server.state.model_name, "messages": [big]})
        assert_openai_error(r, 400, "maximum context length")
        for field in ("max_tokens", "max_completion_tokens"):  # the error names the field the client set
            r = http.post("/v1/chat/completions", json={"model": server.state.model_name, field: 10**6,
                                                        "messages": [{"role": "user", "content": "hi"}]})
            assert assert_openai_error(r, 400, "maximum context length")["param"] == field


def test_bodies_at_the_limit_do_not_stall_the_event_loop(server, expected, http):
    """Bodies just under the limit made of many small values (token ids; chat content parts) are validated on
    the event loop in well under the bystander's second: each string is checked once, with no path built per
    value (before, a 7.7 MiB body of ids stalled every client 2.4 s, and one of 250,000 parts 4.4 s)."""
    room = MAX_BODY - 4096
    ids = json.dumps(body(server, prompt=[7] * (room // 2)), separators=(",", ":"))  # "7," per id
    part = {"type": "text", "text": "a"}
    parts = [part] * (room // (len(json.dumps(part, separators=(",", ":"))) + 1))  # and a comma
    chat = json.dumps({"model": server.state.model_name, "max_tokens": 1,
                       "messages": [{"role": "user", "content": parts}]}, separators=(",", ":"))  # fmt: skip
    assert MAX_BODY - 8192 < len(ids) < MAX_BODY and MAX_BODY - 8192 < len(chat) < MAX_BODY
    with bystander(server, expected):
        for path, content in (("/v1/completions", ids), ("/v1/chat/completions", chat)):
            r = http.post(path, content=content, headers={"content-type": "application/json"})
            assert_openai_error(r, 400, "maximum context length")


def test_caps_on_prompts_and_choices(server, expected, http):
    with bystander(server, expected):
        r = http.post("/v1/completions", json=body(server, prompt=["a"] * 20000))
        assert_openai_error(r, 400, "at most 128")
        r = http.post("/v1/completions", json=body(server, prompt=[[1]] * 20, n=16))
        assert_openai_error(r, 400, "choices")
    r = http.post("/v1/completions", json=body(server, prompt=["a", "b"], n=2, max_tokens=1))
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
