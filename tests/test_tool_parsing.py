"""Reading tool calls out of replies, without a server (server/api/tools.py, server/api/tool_parsers.py): streamed
deltas add up to the non-streamed message for every reply and chunking, calls are read only where they are whole,
each tool's references survive the "required" array, and the parser follows the chat template."""

from __future__ import annotations

import itertools
import json

import jsonschema
import pytest
from test_server_tools import HERMES_TEMPLATE, TOOLS

from hotlora.server.api import tools as T


def _plan(mode: str, name: str | None = None, parallel: bool = True, parser: str = "hermes") -> T.ToolPlan:
    tools = tuple(T.Tool.model_validate(t) for t in TOOLS)
    return T.ToolPlan(mode, tools, name, parser if mode == "auto" else None, parallel)


REPLIES = [
    "plain text, no call at all",
    'Sure.<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}</tool_call>\n'
    '<tool_call>{"name": "now"}',  # the last block unclosed (max_tokens), still a whole object
    'a <tool_ <tool_call>{"name": "unknown", "arguments": {}}</tool_call>',  # no such tool: content
    'x<tool_call>{"name": "now", "arguments": {</tool_call>',  # broken JSON: content
    '<tool_call> {"name": "now", "arguments": "{\\"a\\": 1}"} </tool_call>',  # arguments as a JSON string
    "ends with a partial marker <tool_c",
    '[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Lima", "days": 7}}]',
    '[{"name": "now", "parameters": {}}, {"na',
    '<tool_call>{"name": {"f": 1}, "arguments": {}}</tool_call>',  # a name that is no string: content
    "<tool_call>" + "[" * 5000,  # deeper than json.loads goes: content
    "[" * 5000,
    '<tool_call>{"name": "now"}</tool_call><tool_call>{"name": "now", "arguments": {"x": 1}}</tool_call>',
    # Llama 3's JSON calls
    ' {"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}',
    '<|python_tag|>{"name": "now", "parameters": {}}; {"name": "now", "arguments": {"x": 1}}',
    '{"name": "now", "parameters": {}} and some text',  # text after the call: content
    'Hi {"name": "now", "parameters": {}}',  # text first: content
    "<|python",
    "   ",
    # arguments that are no object (a schema whose "type" xgrammar dropped beside anyOf or enum)
    '[{"name": "now", "parameters": 7}, {"name": "now", "parameters": "x}, ]"}, {"name": "now", "parameters": null}]',
    '<tool_call>{"name": "now", "arguments": {"s": "\\ud800"}}</tool_call>',  # a lone surrogate, escaped
    '<tool_call>{"name": "now", "arguments": {"a": NaN}}</tool_call>',
    '{"name": "now", "parameters": {}}; ',
    # pythonic calls (23-): literals only, keyword arguments only, the whole reply one list
    '[get_weather(city="Oslo", days=2), now()]',
    '<|python_start|>[now(x=-1.5, flags=[true, None], opts={"a": (1, 2)})]<|python_end|>',
    "[now(1)]",
    '[now(x=__import__("os").system("true"))]',
    "[now(x=1), ",
    "Here: [now()]",
    "[now(x=1e999)]",
    '[now(**{"x": 1})]',
    "[now(x={1: 2})]",
    "[now(x=-True)]",
    '[now(x=b"y")]',
    "[now(x=1)] and text",
]


@pytest.mark.parametrize("mode", ["auto", "required", "named", "none", "auto-single", "auto-llama3_json",
                                  "auto-pythonic"])
def test_streamed_deltas_add_up_to_the_final_message(mode):
    """Every reply, cut into pieces of every size from 1 to 7 characters, ended by a stop or by max_tokens: the
    content and calls the deltas add up to, and the finish reason, are final_message's."""
    kind, _, variant = mode.partition("-")
    parser = variant if variant in ("hermes", "llama3_json", "pythonic") else "hermes"
    p = _plan(kind, "get_weather" if mode == "named" else None, variant != "single", parser)
    plan = None if mode == "none" else p
    for reply, size, end in itertools.product(REPLIES, range(1, 8), ("stop", "length")):
        message, finish = T.final_message(plan, reply, end)
        stream, content, calls, sent_finish = T.ToolStream(plan), "", {}, None
        pieces = [reply[i : i + size] for i in range(0, len(reply), size)]
        for k, piece in enumerate(pieces):
            delta, sent_finish = stream.feed(piece, end if k == len(pieces) - 1 else None)
            assert sent_finish is None or k == len(pieces) - 1
            content += delta.get("content", "")
            for tc in delta.get("tool_calls", []):
                call = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
                call["name"] += tc.get("function", {}).get("name", "")
                call["arguments"] += tc.get("function", {}).get("arguments", "")
        assert sent_finish == finish, (reply, size)
        assert content == (message["content"] or ""), (reply, size)
        expected = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
        assert [(c["name"], c["arguments"]) for c in calls.values()] == expected, (reply, size)


def test_replies_read_as_calls_only_when_whole():
    auto, required = _plan("auto"), _plan("required")
    assert T.read_calls(auto, REPLIES[1]) == [("now", "{}")]
    assert T.read_calls(auto, REPLIES[2]) == [("get_weather", '{"city": "Oslo", "days": 1}'), ("now", "{}")]
    assert T.read_calls(auto, REPLIES[5]) == [("now", '{"a": 1}')]
    assert [T.read_calls(auto, REPLIES[i]) for i in (0, 3, 4, 6, 9, 10)] == [None] * 6
    assert T.read_calls(required, REPLIES[11]) is None
    assert T.read_calls(auto, REPLIES[12]) == [("now", "{}"), ("now", '{"x": 1}')]
    assert T.read_calls(_plan("auto", parallel=False), REPLIES[12]) == [("now", "{}")]  # the first call only
    llama = _plan("auto", parser="llama3_json")
    assert T.read_calls(llama, REPLIES[13]) == [("get_weather", '{"city": "Oslo", "days": 2}')]
    assert T.read_calls(llama, REPLIES[14]) == [("now", "{}"), ("now", '{"x": 1}')]
    assert [T.read_calls(llama, REPLIES[i]) for i in (0, 1, 7, 15, 16, 17, 18)] == [None] * 7
    assert T.final_message(llama, REPLIES[13], "stop")[0]["content"] is None
    assert T.read_calls(required, REPLIES[19]) == [("now", "7"), ("now", '"x}, ]"'), ("now", "null")]
    assert T.read_calls(auto, REPLIES[20]) == [("now", '{"s": "\\ud800"}')]  # escaped: it can be sent as UTF-8
    assert T.read_calls(auto, REPLIES[21]) is None  # NaN is no JSON a client can parse
    assert T.read_calls(llama, REPLIES[22]) == [("now", "{}")]
    pythonic = _plan("auto", parser="pythonic")
    assert T.read_calls(pythonic, REPLIES[23]) == [("get_weather", '{"city": "Oslo", "days": 2}'), ("now", "{}")]
    assert T.read_calls(pythonic, REPLIES[24]) == [("now", '{"x": -1.5, "flags": [true, null], "opts": {"a": [1, 2]}}')]
    assert [T.read_calls(pythonic, REPLIES[i]) for i in (0, 7, 11, 13, *range(25, 35))] == [None] * 14
    assert T.final_message(pythonic, REPLIES[23], "stop")[1] == "tool_calls"
    assert T.read_calls(pythonic, "[now(x=1, x=2)]") is None  # a keyword twice: Python refuses it too
    code = "def f(a, b):\n    return (a, b), {a: b}\n" * 4000  # a file's text: long, separators inside its string
    assert T.read_calls(pythonic, f"[now(text={code!r})]") == [("now", json.dumps({"text": code}))]
    many = "[now(x=[" + ", ".join(["1"] * 6000) + "])]"  # too many to parse on the event loop: content
    assert T.read_calls(pythonic, many) is None and T.final_message(pythonic, many, "stop")[0]["content"] == many
    # finish reasons: "tool_calls" only for whole calls; a cut keeps its reason (max_tokens or a stop string)
    assert [T.final_message(required, REPLIES[i], "stop")[1] for i in (7, 8)] == ["tool_calls", "stop"]
    assert T.final_message(required, REPLIES[7], "length")[1] == "length"
    assert T.read_calls(required, REPLIES[7]) == [("now", "{}"), ("get_weather", '{"city": "Lima", "days": 7}')]
    assert T.read_calls(required, REPLIES[8]) == [("now", "{}")]  # cut: the calls begun so far
    assert T.read_calls(required, '[{"name": "now", "parameters": {"a": "\\"}x"') == [("now", '{"a": "\\"}x"')]
    assert T.read_calls(required, "{}") is None and T.read_calls(required, '[{"name": "now"') is None
    message, finish = T.final_message(auto, REPLIES[1], "stop")
    assert (message["content"], finish) == ("Sure.", "tool_calls")
    assert T.final_message(auto, REPLIES[2], "length")[1] == "length"  # cut: the calls read, the reason kept


def test_a_conversation_is_rendered_whatever_its_arguments_hold():
    from hotlora.server.api.schemas import ChatMessage

    for arguments, rendered in (("[" * 100000, "[" * 100000), ('{"a": 1}', {"a": 1}), ("not json", "not json")):
        message = ChatMessage.model_validate({"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]})
        assert T.template_message(message)["tool_calls"][0]["function"]["arguments"] == rendered


def test_required_schema_keeps_each_tools_references():
    """A tool's references ("#", "#/$defs/...", "#/properties/...") resolve in its own schema, wherever the calls
    array puts it; two tools' same-named $defs stay apart."""
    tree = {"type": "object", "properties": {"label": {"type": "string"}, "kids": {"type": "array", "items": {
        "$ref": "#"}}, "twin": {"$ref": "#/properties/label"}}, "required": ["label", "kids"],
        "additionalProperties": False}
    typed = lambda t: {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"],  # noqa: E731
                       "$defs": {"P": {"type": t}}, "additionalProperties": False}
    tools = [T.Tool.model_validate({"type": "function", "function": {"name": n, "parameters": p}})
             for n, p in (("tree", tree), ("f", typed("integer")), ("g", typed("string")))]
    schema = json.loads(T.constraint(tools, "required", None).value)
    assert "maxItems" not in schema and tree["properties"]["kids"]["items"] == {"$ref": "#"}  # the request's copy
    good = [{"name": "tree", "parameters": {"label": "a", "kids": [{"label": "c", "kids": []}], "twin": "b"}},
            {"name": "f", "parameters": {"p": 3}}, {"name": "g", "parameters": {"p": "x"}}]
    jsonschema.validate(good, schema)
    for bad in ([{"name": "tree", "parameters": {"label": "a", "kids": [[{"name": "tree", "parameters": {
                    "label": "b", "kids": []}}]]}}],
                [{"name": "tree", "parameters": {"label": "a", "twin": 1, "kids": []}}],
                [{"name": "f", "parameters": {"p": "x"}}], [{"name": "g", "parameters": {"p": 3}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        assert not _accepts(schema, bad)  # xgrammar resolves them alike
    assert _accepts(schema, good)
    odd = T.Tool.model_validate({"type": "function", "function": {"name": "h", "parameters": {
        "type": "object", "$defs": [1, {"$ref": "#"}], "properties": {"q": {"enum": [{"$ref": "#"}]}}}}})
    moved = json.loads(T.constraint([odd], "required", None).value)["items"]["anyOf"][0]["properties"]["parameters"]
    assert moved["$defs"][1] == {"$ref": "#/items/anyOf/0/properties/parameters"}  # a list walked too
    assert moved["properties"]["q"] == {"enum": [{"$ref": "#"}]}  # data left as it is
    assert json.loads(T.constraint(tools, "required", False).value)["maxItems"] == 1


def _accepts(schema: dict, value: object) -> bool:
    """Whether the grammar the server compiles for `schema` accepts `value` as the server lays JSON out."""
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    return _is_grammar_accept_string(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False),
                                     json.dumps(value))


def test_the_parser_is_picked_from_the_template():
    assert T.pick_parser("auto", HERMES_TEMPLATE) == "hermes"
    assert T.pick_parser("auto", "{{ messages }}") is None and T.pick_parser("auto", None) is None
    assert T.pick_parser("none", HERMES_TEMPLATE) is None and T.pick_parser("hermes", None) == "hermes"
    llama31 = "{%- if tools %}...{{- '<|python_tag|>' + tool_call.name }}{% endif %}"  # the shape of Llama 3.1's
    assert T.pick_parser("auto", llama31) == "llama3_json" and T.pick_parser("llama3_json", None) == "llama3_json"
    llama32 = 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    assert T.pick_parser("auto", llama32) == "llama3_json"
    llama4 = "If you call a function, reply as [func_name1(params_name1=params_value1, params_name2=...), func_name2()]"
    assert T.pick_parser("auto", llama4) == "pythonic" and T.pick_parser("pythonic", None) == "pythonic"
    from hotlora.server.api.tool_parsers import PARSERS
    from hotlora.server.cli import TOOL_PARSERS

    assert TOOL_PARSERS == PARSERS == ("auto", "hermes", "llama3_json", "pythonic", "none")
