"""Tool calling on /v1/chat/completions, with OpenAI's request and response shapes.

- `tool_choice` "required" or a named function: the reply is constrained by a JSON schema, through the same
  grammar path as structured outputs, so each call names one of the request's tools and its arguments follow that
  tool's `parameters`. Named: the reply is the arguments object itself. Required: the reply is a JSON array of
  {"name", "parameters"} objects, one per call (at most one with `parallel_tool_calls: false`).
- "auto" (the default when tools are given): the model writes its calls in its own format and a parser reads them
  back. hermes is built in: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the format of Qwen2/2.5,
  Hermes and many fine-tunes. `--tool-call-parser auto` picks it when the chat template mentions `<tool_call>`;
  with no parser, "auto" is a 400 (vLLM likewise needs --enable-auto-tool-choice).
- "none": the tools are rendered into the prompt (vLLM's default) and the reply is plain content.

Finish reasons follow OpenAI: "tool_calls" when a reply read as calls ("required", "auto"), "stop" for a named
function, "length" whenever max_tokens cut the reply. A reply that does not read as calls (cut inside a call, or
text that is no call) comes back as content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import field_validator

from hotlora.server.api.errors import bad_request
from hotlora.server.api.strict import Strict
from hotlora.server.engine.types import StructuredSpec

HERMES = "hermes"
PARSERS = ("auto", HERMES, "none")  # --tool-call-parser
HERMES_START = "<tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
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
        if v and v.get("type", "object") != "object":
            raise ValueError("a function's parameters must be the JSON schema of an object")
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


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def pick_parser(setting: str, chat_template: Any) -> str | None:
    """The parser "auto" tool choice uses: --tool-call-parser, where "auto" reads the chat template."""
    if setting == "auto":
        return HERMES if HERMES_START in str(chat_template or "") else None
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

    @property
    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template gets them (OpenAI's JSON), or None."""
        return [t.model_dump(exclude_none=True) for t in self.tools] or None


def plan(tools: list[Tool] | None, choice: ToolChoice | None, parser: str | None) -> ToolPlan | None:
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
            "reads (start it with --tool-call-parser hermes if the model writes <tool_call> blocks); "
            "'required' and a named function work with any model",
            param="tool_choice",
        )
    return ToolPlan(mode, tuple(tools), name, parser if mode == "auto" else None)


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or _NO_PARAMETERS


def _calls_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """A JSON array of {"name", "parameters"}, each item one of the tools; the tools' $defs moved to the root,
    where their references ("#/$defs/...") point."""
    defs: dict[str, dict[str, Any]] = {}
    items = []
    for t in tools:
        params = dict(_parameters(t))
        for key in ("$defs", "definitions"):
            for def_name, sub in (params.pop(key, None) or {}).items():
                if defs.setdefault(key, {}).setdefault(def_name, sub) != sub:
                    raise bad_request(f"two tools define {key}/{def_name} differently", param="tools")
        items.append({"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                       "parameters": params},
                      "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema | defs


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
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": _call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _object_text(value: Any) -> str | None:
    if isinstance(value, str):  # some models write the arguments as a JSON string
        value = _arguments(value)
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def read_calls(p: ToolPlan, text: str) -> list[tuple[str, str]] | None:
    """(name, arguments JSON) of each call in a finished "required" or "auto" reply; None: it reads as no calls."""
    if p.mode == "required":
        try:
            found = [(i["name"], i["parameters"]) for i in json.loads(text)]
        except (ValueError, TypeError, KeyError):  # cut short (max_tokens, a stop string)
            return None
    elif p.mode == "auto" and HERMES_START in text:
        try:
            found = [(c.get("name"), c.get("arguments", {})) for c in map(json.loads, _HERMES_CALL.findall(text))]
        except (ValueError, AttributeError):
            return None
    else:
        return None
    calls = [(name, _object_text(args)) for name, args in found]
    if not calls or any(name not in p.names or args is None for name, args in calls):
        return None
    return calls  # type: ignore[return-value]


def final_message(p: ToolPlan | None, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
    """A finished choice's assistant message and finish reason."""
    if p is not None and p.mode == "named":
        return {"role": "assistant", "content": None, "tool_calls": [_call(p.name, text)]}, finish
    calls = None if p is None else read_calls(p, text)
    if calls is None:
        return {"role": "assistant", "content": text}, finish
    content = text[: text.find(HERMES_START)] if p.mode == "auto" else ""
    return {"role": "assistant", "content": content or None, "tool_calls": [_call(*c) for c in calls]}, _called(finish)


def _called(finish: str | None) -> str | None:
    """A reply read as calls ends with "tool_calls", unless max_tokens cut it (its last call may be missing)."""
    return "tool_calls" if finish == "stop" else finish


class ToolStream:
    """One streamed choice: the delta to send for each piece of text, and at the end. Named: the arguments stream
    as they come. Auto: content streams until a call may begin (a partial `<tool_call>` is held back), the rest
    waits for the end. Required: everything waits for the end, where the calls are read as in final_message."""

    def __init__(self, p: ToolPlan | None) -> None:
        self.plan, self.parts, self.sent, self.start = p, [], 0, -1
        self.mode = "none" if p is None else p.mode
        self.id = _call_id()

    def feed(self, new: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """The delta for `new` text (with what the end adds, once `finish` is set) and the finish reason to send."""
        self.parts.append(new)
        delta = self._named(new) if self.mode == "named" else self._content(new)
        if finish is None or self.mode in ("named", "none"):
            return delta, finish
        text = "".join(self.parts)
        calls = read_calls(self.plan, text)
        if calls is None:
            rest = text[self.sent :]
            return (delta | {"content": delta.get("content", "") + rest}) if rest else delta, finish
        tool_calls = [{"index": i, **_call(*c)} for i, c in enumerate(calls)]
        return delta | {"tool_calls": tool_calls}, _called(finish)

    def _named(self, new: str) -> dict[str, Any]:
        if self.sent:
            return {"tool_calls": [{"index": 0, "function": {"arguments": new}}]} if new else {}
        self.sent = 1
        return {"tool_calls": [{"index": 0, "id": self.id, "type": "function",
                                "function": {"name": self.plan.name, "arguments": new}}]}

    def _content(self, new: str) -> dict[str, Any]:
        if self.mode == "none":
            return {"content": new} if new else {}
        if self.mode == "required" or self.start >= 0:
            return {}
        text = "".join(self.parts)
        self.parts = [text]
        at = text.find(HERMES_START, max(0, self.sent - len(HERMES_START)))
        if at >= 0:
            self.start = upto = at
        else:  # hold back a tail that may be the marker's beginning
            upto = len(text) - next((k for k in range(len(HERMES_START) - 1, 0, -1)
                                     if text.endswith(HERMES_START[:k])), 0)
        out, self.sent = text[self.sent : upto], max(self.sent, upto)
        return {"content": out} if out else {}
