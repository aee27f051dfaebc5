"""Structured outputs through HTTP with the official openai client on the default model, one shared server.

Each JSON schema (nested objects, arrays, enums, required fields, numbers with bounds) gets 20 sampled
completions at temperature 1, spread over the base model and 3 peft adapters, all schemas in one
concurrent burst; every one must end with "stop", parse, and validate with `jsonschema`. A regex, a choice
and a small EBNF grammar likewise. Seeds make each draw reproducible whatever shares the batch, so "100%"
is a deterministic claim, not a lucky run. Invalid schemas, regexes and grammars are 400s."""

from __future__ import annotations

import concurrent.futures
import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from server_harness import ServerThread, server_settings, upload

SCHEMAS: dict[str, dict[str, Any]] = {
    # nested objects, an enum, a bounded integer, required fields
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "home": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                     "floor": {"type": "integer", "minimum": 0, "maximum": 20}},
                     "required": ["city", "floor"], "additionalProperties": False},
        },
        "required": ["name", "home"], "additionalProperties": False,
    },
    # arrays (bounded length, bounded items), an array of enums, a nested boolean
    "order": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 1,
                      "maxItems": 3},
            "sizes": {"type": "array", "items": {"enum": ["S", "M", "L"]}, "maxItems": 2},
            "ship": {"type": "object", "properties": {"express": {"type": "boolean"}}, "required": ["express"],
                     "additionalProperties": False},
        },
        "required": ["items", "sizes", "ship"], "additionalProperties": False,
    },
    # numbers with bounds (a float in [0, 1], a negative integer range), an optional field
    "reading": {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "delta": {"type": "integer", "minimum": -50, "maximum": -10},
            "note": {"type": "string", "maxLength": 4},
        },
        "required": ["score", "delta"], "additionalProperties": False,
    },
}
PER_SPEC = 20  # samples per schema / regex / choice / grammar, spread over the base and the 3 adapters
ADAPTERS = ("a", "b", "c")  # distinct peft adapters: different ranks, targets, rslora
MAX_TOKENS = 64  # a bounded number may take a few digits at temperature 1 before the grammar ends it

REGEX = r"[A-Z][a-z]{2,5}-[0-9]{2}"
CHOICES = ["red", "green", "blue"]
# a small arithmetic expression: bounded repetitions, so that every draw can finish within max_tokens
GRAMMAR = 'root ::= term (("+" | "-") term){0,2}\nterm ::= [0-9] | "(" [0-9] ("*" [0-9]){0,1} ")"'
TERM_RE = r"(?:[0-9]|\([0-9](?:\*[0-9])?\))"
GRAMMAR_RE = rf"{TERM_RE}(?:[+-]{TERM_RE}){{0,2}}"


@pytest.fixture(scope="module")
def server(tmp_path_factory, hotlora_cache, peft_dirs):
    settings = server_settings(tmp_path_factory.mktemp("store"), hotlora_cache, num_kv_blocks=256, max_num_seqs=64)
    srv = ServerThread(settings).start()
    with httpx.Client(base_url=srv.url, timeout=120) as http:
        for name in ADAPTERS:
            assert upload(http, name, peft_dirs[name]).status_code in (200, 201)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=900, max_retries=0)  # a busy CI host


@pytest.fixture(scope="module")
def models(server) -> list[str]:
    return [server.state.model_name, *ADAPTERS]


def _burst(calls: list[Callable[[], Any]]) -> list[Any]:
    """Send every call at once (one thread each): they share the engine's batches."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda f: f(), calls))


def _spread(models: list[str]) -> list[tuple[str, int]]:
    """PER_SPEC (model, seed) pairs, the models taking turns."""
    return [(models[i % len(models)], i) for i in range(PER_SPEC)]


def test_json_schemas_validate_across_adapters(client, models):
    calls, schemas = [], []
    for name, schema in SCHEMAS.items():
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        for model, seed in _spread(models):
            schemas.append(schema)
            calls.append(lambda m=model, f=fmt, s=seed: client.chat.completions.create(
                model=m, messages=[{"role": "user", "content": "Reply in JSON."}], temperature=1.0, seed=s,
                max_tokens=MAX_TOKENS, response_format=f))
    results = _burst(calls)
    assert len(results) == PER_SPEC * len(SCHEMAS)
    for schema, r in zip(schemas, results, strict=True):
        c = r.choices[0]
        assert c.finish_reason == "stop", c.message.content
        value = json.loads(c.message.content)
        jsonschema.validate(value, schema)
        assert list(value) == [k for k in schema["properties"] if k in value]  # in the schema's order
    # sampled, not one answer repeated: temperature 1 explores the schema
    assert len({r.choices[0].message.content for r in results}) > len(SCHEMAS) * 5


@pytest.mark.parametrize("kind, value, valid", [
    ("regex", REGEX, lambda t: re.fullmatch(REGEX, t)),
    ("choice", CHOICES, lambda t: t in CHOICES),
    ("grammar", GRAMMAR, lambda t: re.fullmatch(GRAMMAR_RE, t)),
])
def test_regex_choice_and_grammar(client, models, kind, value, valid):
    spec = {"structured_outputs": {kind: value}}
    calls = [lambda m=model, s=seed: client.completions.create(
        model=m, prompt="Answer:", max_tokens=32, temperature=1.0, seed=s, extra_body=spec)
        for model, seed in _spread(models)]
    results = _burst(calls)
    assert len(results) == PER_SPEC
    for r in results:
        c = r.choices[0]
        assert c.finish_reason == "stop" and valid(c.text), (c.finish_reason, c.text)
    assert len({r.choices[0].text for r in results}) > 1


def test_json_object_and_schema_on_the_other_routes(client, models):
    r = client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "A JSON object:"}],
                                       temperature=1.0, seed=1, max_tokens=MAX_TOKENS, n=2,
                                       response_format={"type": "json_object"})
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
        else:  # the grammar could not finish within max_tokens: a prefix of an object, as in vLLM
            assert c.finish_reason == "length" and c.message.content.startswith("{")
    cmpl = client.completions.create(model=models[1], prompt="Reading:", max_tokens=MAX_TOKENS, temperature=1.0,
                                     seed=2, extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                         "name": "reading", "schema": SCHEMAS["reading"]}}})
    jsonschema.validate(json.loads(cmpl.choices[0].text), SCHEMAS["reading"])
    chat = client.chat.completions.create(model=models[2], messages=[{"role": "user", "content": "Pick one."}],
                                          max_tokens=8, temperature=1.0, extra_body={"structured_outputs":
                                                                                     {"choice": CHOICES}})
    assert chat.choices[0].message.content in CHOICES


def test_grammar_that_cannot_finish_ends_with_length(client, models):
    long_array = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 40}
    r = client.completions.create(model=models[3], prompt="Digits:", max_tokens=12, temperature=1.0, seed=3,
                                  extra_body={"structured_outputs": {"json": long_array}})
    c = r.choices[0]
    assert c.finish_reason == "length" and r.usage.completion_tokens == 12
    assert re.fullmatch(r"\[[0-9](, [0-9])*(, ?)?", c.text), c.text  # a prefix of a valid output


@pytest.mark.parametrize("extra, match", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "invalid json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}, "invalid json"),
    ({"extra_body": {"structured_outputs": {"json": {"type": "integer", "minimum": 5, "maximum": 1}}}},
     "invalid json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}}, "uniqueItems.*cannot enforce"),
    ({"extra_body": {"structured_outputs": {"json": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5}}}}}}, "maxLength.*cannot enforce"),
    ({"extra_body": {"structured_outputs": {"regex": "([a-z"}}}, "invalid regex"),
    ({"extra_body": {"structured_outputs": {"regex": "a{3,1}"}}}, "invalid regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= missing_rule"}}}, "invalid grammar"),
    ({"extra_body": {"structured_outputs": {"grammar": 'root ::= "a" |'}}}, "invalid grammar"),
    ({"extra_body": {"structured_outputs": {"grammar": 'start ::= "a"'}}}, "invalid grammar"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "exactly one"),
    ({"extra_body": {"structured_outputs": {"json": "{not json"}}}, "not valid json"),
    ({"extra_body": {"structured_outputs": {"choice": []}}}, "choice"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_invalid_specs_are_400(client, models, extra, match):
    with pytest.raises(openai.BadRequestError, match=re.compile(match, re.I)) as info:
        client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       **extra)
    assert ".cc:" not in str(info.value)  # what is wrong, not where in xgrammar's C++ it was found
    field = "structured_outputs" if "extra_body" in extra else "response_format"
    assert (info.value.param or "").split(".")[0] == field  # the field the spec came in


def test_tool_choices_this_server_cannot_serve_are_400(client, models):
    """The default model's chat template has no tool-call format, so "auto" (the default with tools) has no parser
    here; "required" needs tools. test_server_tools.py serves them."""
    for extra, match in (({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "parser"),
                         ({"tool_choice": "required"}, "needs tools")):
        with pytest.raises(openai.BadRequestError, match=match) as info:
            client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=1, **extra)
        assert info.value.param == "tool_choice"


def test_schemas_too_large_to_compile_in_good_time_are_400(client, models, server):
    """xgrammar's compile time grows faster than the schema (a union of objects the most), and a compile cannot be
    stopped once begun: past 128 KiB a schema is refused before it starts. (Tools count towards the prompt's
    characters too, so on this 512-token model they meet that bound first.)"""
    props = {f"p{k}": {"type": "string", "description": "x" * 40} for k in range(40)}
    big = {"anyOf": [{"type": "object", "properties": props, "required": [f"p{i}"]} for i in range(48)]}
    with pytest.raises(openai.BadRequestError, match="KiB") as info:
        client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       response_format={"type": "json_schema", "json_schema": {"name": "s",
                                                                                               "schema": big}})
    assert info.value.param == "response_format"
    stats = server.call(server.engine.stats)
    assert stats.num_running == 0 and stats.kv_blocks_used == 0


@pytest.mark.parametrize("spec", [{"regex": "[^\\x00-\\U0010FFFF]"}, {"grammar": "root ::= root"}], ids=str)
def test_a_grammar_that_matches_nothing_is_400(server, client, models, spec):
    """It compiles, but allows no first token: the request's fault, a 400 (a 500 before), streamed as an error
    chunk of that type; a request beside it is unaffected."""
    bad = lambda: client.completions.create(model=models[0], prompt="Hi", max_tokens=5,  # noqa: E731
                                            extra_body={"structured_outputs": spec})
    fine = lambda: client.completions.create(model=models[0], prompt="Hi", max_tokens=5)  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        failed, beside = pool.submit(bad), pool.submit(fine)
        with pytest.raises(openai.BadRequestError, match="grammar allows no token"):
            failed.result()
        assert beside.result().choices[0].finish_reason in ("stop", "length")
    body = {"model": models[0], "prompt": "Hi", "max_tokens": 5, "stream": True, "structured_outputs": spec}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    error = events[-1]["error"]
    assert error["type"] == "invalid_request_error" and "grammar allows no token" in error["message"], events


def test_a_grammar_too_costly_to_apply_is_400(server, client, models):
    """A regex that compiles at once but whose mask costs ever more host time a token (seconds within 50 tokens):
    past grammar.FILL_BUDGET_S its request fails with a 400, and a stream beside it keeps going."""
    costly = lambda: client.completions.create(  # noqa: E731
        model=models[0], prompt="Hi", max_tokens=100, extra_body={"ignore_eos": True,
                                                                 "structured_outputs": {"regex": "(.{0,200}){50}"}})
    fine = lambda: client.completions.create(model=models[0], prompt="Hi", max_tokens=40,  # noqa: E731
                                             extra_body={"ignore_eos": True})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        failed, beside = pool.submit(costly), pool.submit(fine)
        with pytest.raises(openai.BadRequestError, match="host time"):
            failed.result()
        assert beside.result().usage.completion_tokens == 40
