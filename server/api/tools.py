"""Tool calling on /v1/chat/completions, with OpenAI's request and response shapes.

- `tool_choice` "required" or a named function: the reply is constrained by a JSON schema, through the same
  grammar path as structured outputs, so each call names one of the request's tools and its arguments follow that
  tool's `parameters`. Named: the reply is the arguments object itself. Required: the reply is a JSON array of
  {"name", "parameters"} objects, one per call (at most one with `parallel_tool_calls: false`).
- "auto" (the default when tools are given): the model writes its calls in its own format and a parser reads them
  back (server/api/tool_parsers.py: hermes, llama3_json, pythonic). `--tool-call-parser auto` picks the one the chat
  template shows; with no parser, "auto" is a 400 (vLLM likewise needs --enable-auto-tool-choice).
- "none": the tools are rendered into the prompt (vLLM's default) and the reply is plain content.

Finish reasons follow OpenAI: "tool_calls" when a reply holds whole calls ("required", "auto"), "stop" for a named
function; a reply cut by max_tokens or a stop string keeps that reason. A "required" reply cut short gives the calls
begun so far; an "auto" reply that does not read as whole calls comes back as content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError, field_validator

from hotlora.server.api.errors import bad_request
from hotlora.server.api.strict import Strict
from hotlora.server.api.tool_parsers import FORMATS, ArrayScanner, detect
from hotlora.server.engine.types import StructuredSpec

_CHOICES = ("none", "auto", "required")
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


class FunctionDef(Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; none: the function takes no arguments
    strict: bool | None = None  # accepted; every schema is enforced

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _FUNCTION_NAME.fullmatch(v):
            raise ValueError(f"function name {v!r}: 1 to 64 letters, digits, '_' or '-'")
        return v

    @field_validator("parameters")
    @classmethod
    def _object(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and v.get("type") != "object":  # as OpenAI: a schema that is not explicitly an object is refused
            raise ValueError('a function\'s parameters must be the JSON schema of an object ("type": "object")')
        return v


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(Strict):
    name: str
    arguments: str  # JSON text, as the API returned it


class ToolCall(Strict):
    """A call in an earlier assistant turn of the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


ToolChoice = Literal[_CHOICES] | NamedToolChoice


def tool_choice(v: Any) -> Any:
    """A before-validator: one error that says what tool_choice takes (the union's would name its branches)."""
    if v is None or v in _CHOICES:
        return v
    if isinstance(v, str):
        raise ValueError(f"tool_choice is 'none', 'auto', 'required' or a named function, not {v[:64]!r}")
    try:
        return NamedToolChoice.model_validate(v)
    except ValidationError as exc:
        where = ".".join(map(str, exc.errors()[0]["loc"]))
        raise ValueError(f"tool_choice is 'none', 'auto', 'required' or {{\"type\": \"function\", \"function\": "
                         f"{{\"name\": ...}}}}; {where or 'it'}: {exc.errors()[0]['msg']}") from None


def pick_parser(setting: str, chat_template: Any) -> str | None:
    """The parser "auto" tool choice uses: --tool-call-parser, where "auto" reads the chat template."""
    if setting == "auto":
        return detect(chat_template)
    return None if setting == "none" else setting


def _mode(tools: list[Tool] | None, choice: ToolChoice | None) -> tuple[str, str | None]:
    if isinstance(choice, NamedToolChoice):
        return "named", choice.function.name
    return choice or ("auto" if tools else "none"), None


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request's tools and tool_choice ask for. mode: none, auto, required or named (the function `name`)."""

    mode: str
    tools: tuple[Tool, ...]
    name: str | None = None
    parser: str | None = None
    parallel: bool = True  # False: the first call only (as OpenAI and vLLM)

    @property
    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template gets them (OpenAI's JSON), or None."""
        return [t.model_dump(exclude_none=True) for t in self.tools] or None


def plan(tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool | None,
         parser: str | None) -> ToolPlan | None:
    """The request's plan, None without tools; a 400 for a choice the request or the server cannot serve."""
    mode, name = _mode(tools, choice)
    if not tools:
        if mode in ("required", "named"):
            raise bad_request(f"tool_choice {mode!r} needs tools", param="tool_choice")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("two tools share a function name", param="tools")
    if mode == "named" and name not in names:
        raise bad_request(f"tool_choice names the function {name!r}, which is not among the tools", param="tool_choice")
    if mode == "auto" and parser is None:
        raise bad_request(
            "tool_choice 'auto' needs a tool-call parser, and this model's chat template has no format the server "
            f"reads (start it with --tool-call-parser, one of {', '.join(FORMATS)}, for a model that writes one); "
            "'required' and a named function work with any model",
            param="tool_choice",
        )
    return ToolPlan(mode, tuple(tools), name, parser if mode == "auto" else None, parallel is not False)


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or _NO_PARAMETERS


_DATA = frozenset({"const", "enum", "default", "examples"})  # keywords whose values are data, not schemas
_NAMES = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})  # name -> schema


def _relocated(schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A copy of `schema` whose local references ("#", "#/$defs/A", "#/properties/x") point where it now sits,
    `prefix`, a JSON pointer (xgrammar resolves pointers through arrays). Iterative: a deep schema is no
    RecursionError."""
    out = dict(schema)
    stack: list[tuple[Any, bool]] = [(out, False)]
    while stack:
        node, names = stack.pop()
        for key, value in list(node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(value, dict | list):
                node[key] = copy = dict(value) if isinstance(value, dict) else list(value)
                if names or not (isinstance(node, dict) and key in _DATA):
                    stack.append((copy, isinstance(node, dict) and key in _NAMES and not names))
            elif key == "$ref" and not names and isinstance(value, str) and value.startswith("#"):
                node[key] = prefix + value[1:]
    return out


def _calls_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """A JSON array of {"name", "parameters"}, each item one of the tools, each tool's references relocated to where
    its schema sits in the array's schema."""
    items = [{"type": "object", "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "parameters": _relocated(_parameters(t), f"#/items/anyOf/{i}/properties/parameters")},
              "required": ["name", "parameters"], "additionalProperties": False}
             for i, t in enumerate(tools)]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def constraint(tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool | None) -> StructuredSpec | None:
    """The JSON schema a reply must follow under "required" or a named function; None otherwise."""
    mode, name = _mode(tools, choice)
    if mode == "named":
        tool = next((t for t in tools or () if t.function.name == name), None)
        schema = None if tool is None else _parameters(tool)
    else:
        schema = _calls_schema(tools, parallel is not False) if mode == "required" and tools else None
    return None if schema is None else StructuredSpec("json", json.dumps(schema, separators=(",", ":")))


def template_message(message: Any) -> dict[str, Any]:
    """A request message as the chat template gets it: tool calls' arguments as objects (templates write them with
    tojson), a tool result's call id."""
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                             for c in message.tool_calls]
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            out["name"] = message.name
    return out


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if isinstance(value, dict) else text


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": _call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _object_text(value: Any) -> str | None:
    """Arguments read from a reply as JSON text; None for no object. ValueError for NaN or infinities (which
    JavaScript's JSON.parse refuses)."""
    if isinstance(value, str):  # some models write the arguments as a JSON string
        value = _arguments(value)
    if not isinstance(value, dict):
        return None
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate escape ("\ud800") read back: keep it escaped
        return json.dumps(value, allow_nan=False)
    return text


def _scanned(events: list[tuple[int, str | None, str]]) -> list[tuple[str, str]]:
    """(name, arguments text) of each call an ArrayScanner saw begin."""
    calls: list[list[str]] = []
    for _, name, text in events:
        if name is not None:
            calls.append([name, ""])
        calls[-1][1] += text
    return [(name, args) for name, args in calls]


def _read_required(p: ToolPlan, text: str) -> tuple[list[tuple[str, str]] | None, bool]:
    """A "required" reply's calls (None for none) and whether its array closed (every call whole)."""
    scanner = ArrayScanner()
    calls = _scanned(scanner.feed(text))
    return (calls if calls and all(name in p.names for name, _ in calls) else None), scanner.whole  # (the grammar's)


def read_calls(p: ToolPlan, text: str) -> list[tuple[str, str]] | None:
    """(name, arguments JSON) of each call in a finished "required" or "auto" reply; None: it reads as no calls.
    "required" gives the arguments as the model wrote them, as a named function does, and a reply cut short gives
    the calls begun so far (the last one's arguments then cut too); "auto" needs whole calls."""
    if p.mode == "required":
        return _read_required(p, text)[0]
    try:
        if p.mode == "auto" and (at := FORMATS[p.parser].begin(text)) >= 0:
            found = FORMATS[p.parser].read(text[at:])
        else:
            return None
        calls = [(name, _object_text(args)) for name, args in found]
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):  # cut short, or not calls at all
        return None
    if not calls or any(not isinstance(name, str) or name not in p.names or args is None for name, args in calls):
        return None
    return calls[: None if p.parallel else 1]  # type: ignore[return-value]


def final_message(p: ToolPlan | None, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
    """A finished choice's assistant message and finish reason."""
    if p is None:
        return {"role": "assistant", "content": text}, finish
    if p.mode == "named":
        return {"role": "assistant", "content": None, "tool_calls": [_call(p.name, text)]}, finish
    calls, whole = _read_required(p, text) if p.mode == "required" else (read_calls(p, text), True)  # auto: whole
    if calls is None:
        return {"role": "assistant", "content": text}, finish
    content = text[: FORMATS[p.parser].begin(text)] if p.mode == "auto" else ""
    return {"role": "assistant", "content": content or None,
            "tool_calls": [_call(*c) for c in calls]}, _called(finish, whole)


def _called(finish: str | None, whole: bool) -> str | None:
    """A reply read as calls ends with "tool_calls" when its calls are whole (as "auto" reads them, and a "required"
    array that closed); one cut by max_tokens or a stop string keeps that reason."""
    return "tool_calls" if whole and finish == "stop" else finish


class ToolStream:
    """One streamed choice: the delta to send for each piece of text, and at the end. Named: the arguments stream
    as they come; required: each call likewise, once its name is whole. Auto: content streams until a call may begin
    (its parser holds back what may be a call's beginning), and the calls go out at the end."""

    def __init__(self, p: ToolPlan | None) -> None:
        self.plan, self.mode = p, "none" if p is None else p.mode
        self.parts: list[str] = []  # the whole reply, joined once at the end
        self.pending = ""  # auto: text not sent yet while no call has begun (short: what the parser holds back)
        self.sent = 0  # characters sent as content
        self.found = False  # auto: a call has begun
        self.id = _call_id()  # named: the call's id
        self.scanner = ArrayScanner() if self.mode == "required" else None
        self.begun = 0  # required: calls sent

    def feed(self, new: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """The delta for `new` text (with what the end adds, once `finish` is set) and the finish reason to send."""
        self.parts.append(new)
        if self.mode == "required":
            return self._required(new, finish)
        delta = self._named(new) if self.mode == "named" else self._content(new)
        if finish is None or self.mode in ("named", "none"):
            return delta, finish
        text = "".join(self.parts)
        calls = read_calls(self.plan, text)
        if calls is None:
            rest = text[self.sent :]
            return (delta | {"content": delta.get("content", "") + rest}) if rest else delta, finish
        tool_calls = [{"index": i, **_call(*c)} for i, c in enumerate(calls)]
        return delta | {"tool_calls": tool_calls}, _called(finish, True)

    def _named(self, new: str) -> dict[str, Any]:
        if len(self.parts) > 1:
            return {"tool_calls": [{"index": 0, "function": {"arguments": new}}]} if new else {}
        return {"tool_calls": [{"index": 0, "id": self.id, "type": "function",
                                "function": {"name": self.plan.name, "arguments": new}}]}

    def _required(self, new: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """Each call goes out as it is generated: its id and name once its name is whole, then its arguments."""
        entries: list[dict[str, Any]] = []
        for index, name, text in self.scanner.feed(new):
            if name is not None:
                entries.append({"index": index, "id": _call_id(), "type": "function",
                                "function": {"name": name, "arguments": text}})
                self.begun += 1
            elif entries and entries[-1]["index"] == index:
                entries[-1]["function"]["arguments"] += text
            elif text:
                entries.append({"index": index, "function": {"arguments": text}})
        delta = {"tool_calls": entries} if entries else {}
        if finish is None:
            return delta, None
        if not self.begun:  # no call began: the reply is content (as final_message says)
            return {"content": "".join(self.parts)}, finish
        return delta, _called(finish, self.scanner.whole)

    def _content(self, new: str) -> dict[str, Any]:
        if self.mode == "none":
            return {"content": new} if new else {}
        if self.found:
            return {}
        pending = self.pending + new
        upto, self.found = FORMATS[self.plan.parser].release(pending, self.sent)
        out, self.pending = pending[:upto], pending[upto:]
        self.sent += len(out)
        return {"content": out} if out else {}
