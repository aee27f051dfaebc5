"""The server end to end: a real uvicorn on loopback, the default model (SmolLM2-135M, --quant none),
adapters saved by peft on that very architecture, driven with the openai client and httpx."""

from __future__ import annotations

import asyncio
import gc
import shutil
from pathlib import Path

import openai
import pytest
from server_harness import (
    AUTH,
    GREEDY,
    PROMPT,
    ServerThread,
    assert_openai_error,
    complete,
    server_settings,
    stream_across_swap,
    upload,
)

MAX_LEN = 512  # server_settings() default max_model_len


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, peft_dirs) -> Path:
    root = tmp_path_factory.mktemp("store")
    for name in ("a", "b"):  # dropped in by hand before the start: registered at start-up
        shutil.copytree(peft_dirs[name], root / name)
    shutil.copytree(peft_dirs["tiny"], root / "broken")  # another base's shapes: refused at start-up, not served
    return root


@pytest.fixture(scope="module")
def server(adapter_dir, hotlora_cache):
    srv = ServerThread(server_settings(adapter_dir, hotlora_cache)).start()
    yield srv
    srv.stop()


def test_models_lists_base_and_adapters_registered_at_start(http, server):
    data = http.get("/v1/models").json()["data"]
    base = server.state.model_name
    assert data[0]["id"] == base and data[0]["parent"] is None
    assert {(m["id"], m["parent"]) for m in data[1:]} == {("a", base), ("b", base)}
    r = http.post("/v1/completions", json={"model": "broken", "prompt": "hi", "max_tokens": 1})
    assert_openai_error(r, 404, "does not exist")


def test_chat_completion_through_the_template(client, server):
    r = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, **GREEDY,
        store=False, service_tier="auto", metadata={"team": "sql"},  # honoured as they are: nothing kept, one tier
    )
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "Say hi"}]
    text = server.state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    templated = server.state.tokenizer.encode(text, add_special_tokens=False)
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens == len(templated)
    chunks = list(client.chat.completions.create(model="a", messages=messages, max_tokens=4, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_null_where_openai_allows_it_means_the_default(http):
    """n, stream, echo and chat's logprobs may be null in OpenAI's spec (vLLM declares them Optional): one
    non-streamed choice with no echo and no logprobs, as when they are left out."""
    greedy = {"temperature": 0.0, "ignore_eos": True}
    nulls = {"n": None, "stream": None, "max_tokens": 3} | greedy
    got = http.post("/v1/completions", json={"model": "a", "prompt": PROMPT, "echo": None} | nulls)
    want = http.post("/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 3} | greedy)
    assert got.status_code == want.status_code == 200, got.text
    assert [c["text"] for c in got.json()["choices"]] == [c["text"] for c in want.json()["choices"]]
    assert got.json()["choices"][0]["logprobs"] is None
    chat = {"model": "a", "messages": [{"role": "user", "content": "Say hi"}], "logprobs": None} | nulls
    r = http.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None


def test_concurrent_streams_with_different_adapters_match_their_solo_outputs(client, server):
    models = [server.state.model_name, "a", "b"]
    solo = {m: complete(client, m) for m in models}
    assert solo["a"] != solo[models[0]] and solo["b"] != solo[models[0]]

    async def stream(aclient: openai.AsyncOpenAI, model: str) -> str:
        chunks = await aclient.completions.create(model=model, prompt=PROMPT, max_tokens=6, stream=True, **GREEDY)
        return "".join([c.choices[0].text async for c in chunks])

    async def main() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300, max_retries=0)
        return await asyncio.gather(*(stream(aclient, m) for m in [*models, "a", "b"]))

    assert asyncio.run(main()) == [solo[m] for m in [*models, "a", "b"]]


def test_uploaded_adapter_serves_the_very_next_request(http, client, server):
    r = upload(http, "c", server_peft(server)["c"])
    assert r.status_code == 201 and r.json()["rank"] == 2, r.text
    assert complete(client, "c") != complete(client, server.state.model_name)


def test_reupload_hot_swaps_while_a_sequence_is_in_flight(http, client, server):
    dirs = server_peft(server)
    assert upload(http, "swap", dirs["x"]).status_code == 201
    assert upload(http, "y-ref", dirs["y"]).status_code == 201
    n = 32  # long enough that the swap lands while it runs, even on a busy machine
    old, new = complete(client, "swap", n), complete(client, "y-ref", n)
    assert old != new
    assert stream_across_swap(http, server, "swap", n, "swap", dirs["y"]) == old  # it finished on the old weights
    assert complete(client, "swap", n) == new  # new requests get the new ones


def test_delete_then_404(http, client, server):
    assert upload(http, "doomed", server_peft(server)["a"]).status_code == 201
    assert http.delete("/admin/adapters/doomed", headers=AUTH).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(client, "doomed")
    assert "doomed" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert "doomed" not in server.state.store.list()


def test_bad_inputs_get_4xx_and_change_nothing(http, client, server):
    dirs = server_peft(server)
    base = server.state.model_name
    store_before = server.state.store.list()
    admin_before = http.get("/admin/adapters", headers=AUTH).json()["data"]
    dora = dirs["a"].parent / "dora"
    shutil.copytree(dirs["a"], dora, dirs_exist_ok=True)
    (dora / "adapter_config.json").write_text(
        (dirs["a"] / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true')
    )
    cases = [
        (http.post("/v1/completions", json={"model": "no-such-adapter", "prompt": "hi"}), 404, "does not exist"),
        (
            http.post("/v1/completions", json={"model": base, "prompt": list(range(1, MAX_LEN + 10))}),
            400,
            "maximum context length",
        ),
        (
            http.post("/v1/completions", json={"model": base, "prompt": "hi", "max_tokens": MAX_LEN}),
            400,
            "maximum context length",
        ),
        (http.post("/v1/completions", json={"model": base, "prompt": [10**9]}), 400, "token ids"),
        (http.post("/v1/completions", json={"model": base, "prompt": "hi", "temperature": -1}), 400, "temperature"),
        (http.post("/v1/completions", json={"model": base, "prompt": "hi", "top_p": 0}), 400, "top_p"),
        (http.post("/v1/completions", json={"model": base, "prompt": "hi", "n": 0}), 400, "n"),
        (http.post("/v1/completions", json={"model": base, "prompt": "hi", "stop": [""]}), 400, "stop"),
        (http.post("/v1/completions", json={"model": base, "prompt": "hi", "logprobs": 99}), 400, "logprobs"),
        (http.post("/v1/completions", json={"model": base, "prompt": []}), 400, "empty"),
        (http.post("/v1/completions", json={"model": base, "prompt": [[5, 6], []]}), 400, "empty"),
        (
            http.post("/v1/completions", json={"model": base, "prompt": "hi", "frequency_penalty": 3}),
            400,
            "frequency_penalty",
        ),
        (http.post("/v1/completions", json={"model": base, "prompt": "hi", "suffix": "x"}), 400, "not supported"),
        (http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
        (http.post("/v1/chat/completions", json={"model": base, "messages": []}), 400, "messages"),
        (
            http.post("/v1/chat/completions", json={"model": base, "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            "role",
        ),
        (
            http.post(
                "/v1/chat/completions",
                json={"model": "a", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            ),
            400,
            "tool",
        ),
        *(
            (http.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "x"}],
                                                     field: value}), 400, field)
            for field, value in (("store", True), ("service_tier", "flex"), ("service_tier", "priority"))
        ),
        (upload(http, "rank-too-big", dirs["big"]), 400, "maximum LoRA rank 16"),
        (upload(http, "other-base", dirs["tiny"]), 400, "do not fit the base projection"),
        (upload(http, "dora", dora), 400, "DoRA"),
        (upload(http, "a", dirs["tiny"]), 400, "do not fit"),  # a failed re-upload keeps the old adapter
        (upload(http, "bad name!", dirs["a"]), 400, "invalid adapter name"),
        (upload(http, "..", dirs["a"]), 404, "not found"),  # the client normalises the path: no such route
        (
            http.post("/admin/adapters/pickled", files={"f": ("adapter_model.bin", b"\x80\x04.")}, headers=AUTH),
            400,
            "pickled",
        ),
        (
            http.post(
                "/admin/adapters/huge", content=b"\0" * (65 << 20), headers=AUTH | {"content-type": "application/zip"}
            ),
            413,
            "larger than",
        ),
    ]
    for r, status, match in cases:
        assert_openai_error(r, status, match)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=base, prompt="hi", max_tokens=-3)
    assert server.state.store.list() == store_before
    assert http.get("/admin/adapters", headers=AUTH).json()["data"] == admin_before
    assert complete(client, "a", 2) and complete(client, base, 2)  # still serving


def test_metrics(http):
    text = http.get("/metrics").text
    assert 'vllm:lora_requests_info{max_lora="3",running_lora_adapters="",waiting_lora_adapters=""}' in text
    assert 'hotlora_adapter_loads_total{adapter="a"}' in text
    for name in (
        "hotlora_time_to_first_token_seconds_count",
        "hotlora_inter_token_latency_seconds_count",
        "hotlora_e2e_request_latency_seconds_count",
        "hotlora_prompt_tokens_total",
        "hotlora_generation_tokens_total",
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_waiting",
        'hotlora_gc_pause_seconds_count{generation="0"}',
    ):
        assert name in text
    assert gc.get_freeze_count() > 0  # the start-up heap, frozen once the engine was ready (--gc-freeze)


def test_adapters_survive_a_restart(server, adapter_dir, hotlora_cache):
    """Last in this module: stops the shared server and starts a new one on the same adapter dir."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300, max_retries=0)
    before = {m: complete(client, m) for m in ("swap", "c")}
    server.stop()
    assert gc.get_freeze_count() == 0  # thawed at shutdown: the stopped engine is collectable
    again = ServerThread(server_settings(adapter_dir, hotlora_cache)).start()
    try:
        client = openai.OpenAI(base_url=again.url + "/v1", api_key="unused", timeout=300, max_retries=0)
        names = {m.id for m in client.models.list().data}
        assert {"a", "b", "c", "swap", "y-ref"} <= names and "doomed" not in names
        assert {m: complete(client, m) for m in before} == before
    finally:
        again.stop()


def server_peft(server: ServerThread) -> dict[str, Path]:
    return server.peft_dirs


@pytest.fixture(autouse=True)
def _attach_peft(server, peft_dirs):
    server.peft_dirs = peft_dirs
