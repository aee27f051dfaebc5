"""Structured outputs through HTTP with the official openai client on the default model: JSON schemas,
json_object, vLLM's regex / choice / EBNF grammar, sampled at temperature 1 on the base and adapters in
one concurrent burst; every output must parse and validate. Invalid specs are 400s."""

from __future__ import annotations

import concurrent.futures
import json
import re

import httpx
import jsonschema
import openai
import pytest
from server_harness import ServerThread, server_settings, upload

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "size": {"enum": ["small", "large"]},
            "items": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 1,
                      "maxItems": 3},
            "ship": {"type": "object", "properties": {"express": {"type": "boolean"}}, "required": ["express"],
                     "additionalProperties": False},
        },
        "required": ["size", "items", "ship"], "additionalProperties": False,
    },
    "score": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score"], "additionalProperties": False,
    },
}
PER_MODEL = 2  # samples per schema and model: base + 2 adapters -> 6 per schema, all concurrent
MAX_TOKENS = 96  # generous: a number at temperature 1 may take many digits before the grammar ends it


@pytest.fixture(scope="module")
def server(tmp_path_factory, hotlora_cache, peft_dirs):
    srv = ServerThread(server_settings(tmp_path_factory.mktemp("store"), hotlora_cache, num_kv_blocks=128,
                                       max_num_seqs=32)).start()
    with httpx.Client(base_url=srv.url, timeout=120) as http:
        for name in ("a1", "a2"):
            assert upload(http, name, next(iter(peft_dirs.values()))).status_code in (200, 201)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def models(server) -> list[str]:
    return [server.state.model_name, "a1", "a2"]


def _burst(calls) -> list:
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda f: f(), calls))


def test_json_schemas_validate_across_adapters(client, models):
    calls = []
    for name, schema in SCHEMAS.items():
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        for model in models:
            for seed in range(PER_MODEL):
                calls.append((schema, lambda m=model, f=fmt, s=seed: client.chat.completions.create(
                    model=m, messages=[{"role": "user", "content": "Reply in JSON."}], temperature=1.0, seed=s,
                    max_tokens=MAX_TOKENS, response_format=f)))
    results = _burst([c for _, c in calls])
    for (schema, _), r in zip(calls, results, strict=True):
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_json_object_and_completions_route(client, models):
    r = client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "A JSON object:"}],
                                       temperature=1.0, seed=1, max_tokens=MAX_TOKENS, n=2,
                                       response_format={"type": "json_object"})
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
        else:  # the grammar could not finish within max_tokens: a prefix of an object, as in vLLM
            assert c.finish_reason == "length" and c.message.content.startswith("{")
    cmpl = client.completions.create(model=models[1], prompt="Age:", max_tokens=MAX_TOKENS, temperature=1.0,
                                     extra_body={"structured_outputs": {"json": SCHEMAS["score"]}})
    jsonschema.validate(json.loads(cmpl.choices[0].text), SCHEMAS["score"])


def test_regex_choice_and_grammar(client, models):
    kinds = {
        "regex": (r"[A-Z][a-z]{2,5}-[0-9]{2}", lambda t: re.fullmatch(r"[A-Z][a-z]{2,5}-[0-9]{2}", t)),
        "choice": (["red", "green", "blue"], lambda t: t in ("red", "green", "blue")),
        "grammar": ('root ::= "(" item ("," item)* ")"\nitem ::= [0-9]+ | "x"',
                    lambda t: re.fullmatch(r"\((?:[0-9]+|x)(?:,(?:[0-9]+|x))*\)", t)),
    }
    calls = [(check, lambda m=model, k=kind, v=value, s=seed: client.completions.create(
        model=m, prompt="Answer:", max_tokens=24, temperature=1.0, seed=s, extra_body={"structured_outputs": {k: v}}))
        for kind, (value, check) in kinds.items() for model in models for seed in range(PER_MODEL)]
    for (check, _), r in zip(calls, _burst([c for _, c in calls]), strict=True):
        c = r.choices[0]
        assert c.finish_reason == "length" or check(c.text), c.text
        assert c.finish_reason == "stop" or len(c.text) > 0


@pytest.mark.parametrize("extra, match", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "invalid json"),
    ({"extra_body": {"structured_outputs": {"regex": "([a-z"}}}, "invalid regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= missing_rule"}}}, "invalid grammar"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "exactly one"),
    ({"extra_body": {"structured_outputs": {"json": "{not json"}}}, "not valid json"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_invalid_specs_are_400(client, models, extra, match):
    with pytest.raises(openai.BadRequestError, match=re.compile(match, re.I)):
        client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       **extra)


def test_tools_are_still_refused(client, models):
    with pytest.raises(openai.BadRequestError, match="tool"):
        client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
