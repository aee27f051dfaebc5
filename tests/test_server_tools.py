"""Tool calling on /v1/chat/completions with the official openai client: a real server on the default model, whose
tokenizer here carries a hermes-style chat template (tools in the system turn, calls as <tool_call> blocks), so the
server picks the hermes parser for tool_choice "auto" by itself. Forced calls ("required", a named function) must be
exactly what structured outputs give for the same schema and prompt; streamed calls must add up to the non-streamed
ones; the rendered prompt must be transformers' own rendering of the conversation. The reading of replies, without
a server, is in test_tool_parsing.py."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import re
import shutil

import httpx
import jsonschema
import openai
import pytest
from server_harness import ServerThread, server_settings, upload

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "the forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "now", "description": "the time"}},
]
NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}
ASK = [{"role": "user", "content": "What is the weather in Oslo for the next 3 days?"}]
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
To call one, reply with <tool_call>{"name": <name>, "arguments": <arguments>}</tool_call>.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{{ message.content or "" }}
{%- for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, default_model_dir):
    folder = tmp_path_factory.mktemp("hermes-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, folder / name)
    (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, hotlora_cache, peft_dirs, tokenizer_dir):
    settings = server_settings(tmp_path_factory.mktemp("store"), hotlora_cache, tokenizer=tokenizer_dir,
                               max_model_len=1024, num_kv_blocks=256)
    srv = ServerThread(settings).start()
    with httpx.Client(base_url=srv.url, timeout=120) as http:
        assert upload(http, "a", peft_dirs["a"]).status_code in (200, 201)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=600, max_retries=0)


@pytest.fixture(scope="module")
def models(server) -> list[str]:
    return [server.state.model_name, "a"]


def _chat(client, model, **kw):
    return client.chat.completions.create(model=model, messages=kw.pop("messages", ASK), tools=kw.pop("tools", TOOLS),
                                          temperature=kw.pop("temperature", 0), **kw)


def _streamed(client, model, **kw) -> tuple[str, list[dict], str | None]:
    """A streamed reply added up as the openai client's users do: (content, calls by index, finish reason)."""
    content, calls, finish = "", {}, None
    for chunk in _chat(client, model, stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def _calls(message) -> list[dict]:
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]


def _structured(client, model, schema, **kw) -> str:
    """The same prompt (tools rendered, tool_choice none) constrained by `schema` as a structured output."""
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    r = _chat(client, model, tool_choice="none", response_format=fmt, **kw)
    assert r.choices[0].finish_reason == "stop"
    return r.choices[0].message.content


def _each(models: list[str], check) -> None:
    """check(model) for every model at once (their requests share the engine's batches); the first failure raises."""
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        list(pool.map(check, models))


def test_a_named_function_gets_its_parameters_schema(client, models):
    named = {"type": "function", "function": {"name": "get_weather"}}

    def check(model: str) -> None:
        r = _chat(client, model, tool_choice=named, max_tokens=40, n=2)
        assert [c.finish_reason for c in r.choices] == ["stop", "stop"]  # OpenAI's reason for a forced function
        (call,) = _calls(r.choices[0].message)
        assert r.choices[0].message.content is None and call["name"] == "get_weather"
        assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
        jsonschema.validate(json.loads(call["arguments"]), WEATHER)
        assert call["arguments"] == _structured(client, model, WEATHER, max_tokens=40)
        assert _calls(r.choices[1].message)[0]["arguments"] == call["arguments"]  # greedy: both choices alike
        content, streamed, finish = _streamed(client, model, tool_choice=named, max_tokens=40)
        assert (content, finish) == ("", "stop") and len(streamed) == 1 and streamed[0]["id"].startswith("call_")
        assert (streamed[0]["name"], streamed[0]["arguments"]) == ("get_weather", call["arguments"])

    _each(models, check)
    r = _chat(client, models[0], tool_choice={"type": "function", "function": {"name": "now"}}, max_tokens=8)
    assert _calls(r.choices[0].message)[0]["arguments"] == "{}"  # no parameters: an empty object


def test_required_calls_name_a_tool_and_follow_its_schema(client, models):
    one = {"type": "array", "minItems": 1, "maxItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"type": "string", "enum": ["get_weather"]}, "parameters": WEATHER},
         "required": ["name", "parameters"], "additionalProperties": False},
        {"type": "object", "properties": {"name": {"type": "string", "enum": ["now"]}, "parameters": NO_ARGS},
         "required": ["name", "parameters"], "additionalProperties": False}]}}
    def three_ways(model: str, seed: int) -> tuple:
        kw = {"tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 60, "temperature": 1.0,
              "seed": seed}
        same = {k: v for k, v in kw.items() if k != "tool_choice"}
        return _chat(client, model, **kw), _structured(client, model, one, **same), _streamed(client, model, **kw)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # sharing the engine's batches
        runs = list(pool.map(lambda ms: three_ways(*ms), itertools.product(models, range(2))))
    seen = set()
    for r, structured, (content, streamed, finish) in runs:
        assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
        (call,) = _calls(r.choices[0].message)
        jsonschema.validate(json.loads(call["arguments"]), WEATHER if call["name"] == "get_weather" else NO_ARGS)
        (item,) = json.loads(structured)
        assert (call["name"], json.loads(call["arguments"])) == (item["name"], item["parameters"])
        assert (content, finish) == ("", "tool_calls")
        assert [(c["name"], c["arguments"]) for c in streamed] == [(call["name"], call["arguments"])]
        seen.add(call["name"])
    assert seen == {"get_weather", "now"}  # sampled: both tools came up
    stream = _chat(client, models[0], tools=TOOLS[:1], tool_choice="required", parallel_tool_calls=False,
                   max_tokens=60, stream=True)
    pieces = [c for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert len(pieces) > 3 and pieces[0].choices[0].delta.tool_calls[0].id  # streamed as generated, id first
    # cut short by max_tokens: no call can be read, so the text comes back as content
    r = _chat(client, models[0], tool_choice="required", max_tokens=3)
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content.startswith("[")
    assert _streamed(client, models[0], tool_choice="required", max_tokens=3) == (
        r.choices[0].message.content, [], "length")


def test_auto_reads_the_hermes_calls_the_model_writes(client, models):
    """The model is held to a hermes reply by a structured-output choice (it would not write one by itself): the
    parser reads the calls back out of it, streamed or not; a plain reply stays content."""
    call = '{"name": "get_weather", "arguments": {"city": "Lima", "days": 2}}'
    reply = f"Let me check.<tool_call>\n{call}\n</tool_call>\n<tool_call>\n{{\"name\": \"now\"}}\n</tool_call>"
    held = {"structured_outputs": {"choice": [reply]}}

    def check(model: str) -> None:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:  # one batch: each forced token is a step
            runs = [pool.submit(_chat, client, model, max_tokens=200, extra_body=held),
                    pool.submit(_streamed, client, model, max_tokens=200, extra_body=held),
                    pool.submit(_chat, client, model, max_tokens=12),  # tool_choice auto by default
                    pool.submit(_chat, client, model, max_tokens=12, tool_choice="none"),
                    pool.submit(_streamed, client, model, max_tokens=12)]
            r, (content, streamed, finish), plain, none, (plain_streamed, _, _) = (f.result() for f in runs)
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and message.content == "Let me check."
        calls = [(c["name"], json.loads(c["arguments"])) for c in _calls(message)]
        assert calls == [("get_weather", {"city": "Lima", "days": 2}), ("now", {})]
        assert (content, finish) == ("Let me check.", "tool_calls")
        assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == calls
        assert not plain.choices[0].message.tool_calls
        assert plain.choices[0].message.content == none.choices[0].message.content == plain_streamed

    _each(models, check)


def test_a_conversation_with_calls_renders_as_transformers_renders_it(client, models, server, tokenizer_dir):
    from transformers import AutoTokenizer

    args = {"city": "Paris", "days": 3}
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    r = _chat(client, models[1], messages=history, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    reference = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = tok.apply_chat_template(reference, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert '"arguments": {"city": "Paris", "days": 3}' in text and "<tool_response>" in text
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    without = client.chat.completions.create(model=models[0], messages=ASK, max_tokens=1)
    assert _chat(client, models[0], max_tokens=1, tool_choice="none").usage.prompt_tokens > without.usage.prompt_tokens


@pytest.mark.parametrize("extra, param, match", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among the tools"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools", "share a function name"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "function name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     "object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}}}], "tool_choice": "required"},
     "tools", "uniqueItems"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "not both"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {}}}}]}, "tools",
     "object"),  # no "type": refused, as OpenAI does
    ({"tools": []}, "tools", "at least 1"),
    ({"tool_choice": {"type": "function", "name": "now"}}, "tool_choice", "function: Field required"),
    ({"tool_choice": "any"}, "tool_choice", "not 'any'"),
    ({"messages": [{"role": "tool", "content": "3"}]}, "messages", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages", "assistant"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_tool_requests_are_400(client, models, server, extra, param, match):
    kw = {"tools": TOOLS, "messages": ASK} | extra
    with pytest.raises(openai.BadRequestError, match=match) as info:
        client.chat.completions.create(model=models[0], max_tokens=4, **{k: v for k, v in kw.items() if v is not None})
    assert (info.value.param or "").split(".")[0] == param
    stats = server.call(server.engine.stats)
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0
