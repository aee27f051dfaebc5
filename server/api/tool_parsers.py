"""How tool_choice "auto" finds the calls a model wrote in its own format (server/api/tools.py uses them).

Each parser says where in a whole reply the calls begin (the text before them is content), reads the calls from
there, and, while a reply streams, how much of the text not sent yet may go out as content.
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks anywhere in the reply (Qwen2/2.5,
  Hermes and many fine-tunes).
- llama3_json: a reply that is one JSON object `{"name": ..., "parameters": {...}}`, or several separated by `;`,
  optionally after `<|python_tag|>` (Llama 3.1 and 3.2's JSON tool calling).
- pythonic: a reply that is one Python list of calls with keyword arguments, `[f(a=1, b="x"), g()]`, optionally
  between `<|python_start|>` and `<|python_end|>` (Llama 4, Llama 3.2's pythonic template, Gemma 3's guide,
  ToolACE). Only literals are read (ast, never evaluated); JSON's true, false and null are taken too.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any, ClassVar


class HermesParser:
    START = "<tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)

    def begin(self, text: str) -> int:
        return text.find(self.START)

    def read(self, text: str) -> list[tuple[Any, Any]]:
        """(name, arguments) of each block; raises ValueError (or AttributeError) where one is no call."""
        return [(c.get("name"), c.get("arguments", {})) for c in map(json.loads, self._CALL.findall(text))]

    def release(self, pending: str, sent: int) -> tuple[int, bool]:
        """(how much of `pending` may go out as content, whether the calls begin there)."""
        at = pending.find(self.START)
        if at >= 0:
            return at, True
        held = next((k for k in range(len(self.START) - 1, 0, -1) if pending.endswith(self.START[:k])), 0)
        return len(pending) - held, False  # a tail that may be the marker's beginning waits


class _WholeReply:
    """A format whose reply is calls and nothing else: it begins (after spaces) with OPENING or TAG."""

    TAG: ClassVar[str]
    OPENING: ClassVar[str]

    def begin(self, text: str) -> int:
        body = text.lstrip()
        return 0 if body.startswith((self.OPENING, self.TAG)) else -1

    def release(self, pending: str, sent: int) -> tuple[int, bool]:
        if sent:  # the reply began as text: it is content to the end
            return len(pending), False
        body = pending.lstrip()
        if body.startswith((self.OPENING, self.TAG)):
            return 0, True
        if not body or self.TAG.startswith(body):  # not decided yet
            return 0, False
        return len(pending), False


class Llama3JsonParser(_WholeReply):
    TAG, OPENING = "<|python_tag|>", "{"

    def read(self, text: str) -> list[tuple[Any, Any]]:
        """(name, parameters) of each object; raises ValueError (or AttributeError) where the reply is not calls
        and nothing else."""
        body = text.lstrip().removeprefix(self.TAG)
        decoder, at, found = json.JSONDecoder(), 0, []
        while True:
            at = len(body) - len(body[at:].lstrip())
            obj, at = decoder.raw_decode(body, at)
            found.append((obj.get("name"), obj.get("parameters", obj.get("arguments", {}))))
            rest = body[at:].lstrip()
            if not rest.startswith(";") and rest:
                raise ValueError("text after a call")
            if not rest.removeprefix(";").strip():  # the last call (a trailing ';' too)
                return found
            at = len(body) - len(rest) + 1


class PythonicParser(_WholeReply):
    """Calls are read on the event loop, once a reply ends, and ast.parse's time grows with the reply's tokens
    (many times json.loads's for the same text): a reply past MAX_CHARS characters, or with more than
    MAX_SEPARATORS separators outside its string literals (a cheap count), reads as content. Long string arguments
    (a file's text) cost little. Tool names that are no Python identifiers (a '-') and keyword parameters cannot
    be written in this format; their calls read as content, as in vLLM."""

    TAG, OPENING, END = "<|python_start|>", "[", "<|python_end|>"
    MAX_CHARS, MAX_SEPARATORS = 1 << 18, 5000
    _STRINGS = re.compile(r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"|\'[^\'\\\n]*(?:\\.[^\'\\\n]*)*\'')
    _SEPARATORS = re.compile(r"[,(\[{=:]")
    _NAMES: ClassVar[dict[str, Any]] = {"True": True, "False": False, "None": None,
                                        "true": True, "false": False, "null": None}

    def read(self, text: str) -> list[tuple[Any, Any]]:
        """(name, keyword arguments) of each call; ValueError where the reply is not a list of calls and nothing
        else, or an argument is no literal."""
        body = text.strip().removeprefix(self.TAG).removesuffix(self.END).strip()
        if len(body) > self.MAX_CHARS or len(self._SEPARATORS.findall(self._STRINGS.sub("", body))) > \
                self.MAX_SEPARATORS:
            raise ValueError("too large a reply to read as calls")
        try:
            tree = ast.parse(body, mode="eval").body
        except (SyntaxError, MemoryError) as exc:  # cut short, nested past the parser's limit, or not Python
            raise ValueError("not a list of calls") from exc
        if not isinstance(tree, ast.List):
            raise ValueError("not a list of calls")
        calls = []
        for call in tree.elts:
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
                raise ValueError("not a call with keyword arguments")
            keys = [k.arg for k in call.keywords]
            if None in keys or len(set(keys)) != len(keys):  # **kwargs, or a keyword twice (Python refuses it)
                raise ValueError("not a call with keyword arguments")
            calls.append((call.func.id, {k.arg: self._value(k.value) for k in call.keywords}))
        return calls

    def _value(self, node: ast.expr) -> Any:
        """A literal's value: strings, finite numbers, booleans, None, lists, tuples, dicts with string keys."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str | bool | int | float | None):
            if isinstance(node.value, float) and not math.isfinite(node.value):
                raise ValueError("a number JSON cannot hold")
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = self._value(node.operand)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError("a sign on no number")
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.Name) and node.id in self._NAMES:
            return self._NAMES[node.id]
        if isinstance(node, ast.List | ast.Tuple):
            return [self._value(e) for e in node.elts]
        if isinstance(node, ast.Dict):
            keys = [self._value(k) if k is not None else None for k in node.keys]
            if not all(isinstance(k, str) for k in keys):
                raise ValueError("a dict key that is no string")
            return dict(zip(keys, map(self._value, node.values), strict=True))
        raise ValueError("an argument that is no literal")


FORMATS: dict[str, HermesParser | Llama3JsonParser | PythonicParser] = {
    "hermes": HermesParser(), "llama3_json": Llama3JsonParser(), "pythonic": PythonicParser()}
PARSERS = ("auto", *FORMATS, "none")  # --tool-call-parser: auto reads the chat template (detect)
# what a chat template holds when the model writes that format (checked in this order): Llama 3.1's shows its tag,
# and Llama 3.1 and 3.2's ask for {"name": function name, "parameters": dictionary of argument name and its value};
# pythonic templates show the list to write, "[func_name1(params_name1=params_value1, ...), func_name2(params)]"
_SIGNS = (("hermes", HermesParser.START), ("llama3_json", Llama3JsonParser.TAG),
          ("llama3_json", '"parameters": dictionary of argument name'), ("pythonic", PythonicParser.TAG),
          ("pythonic", "[func_name1(params_name1="))


def detect(chat_template: Any) -> str | None:
    """The format a chat template's model writes its calls in, or None."""
    text = str(chat_template or "")
    return next((name for name, sign in _SIGNS if sign in text), None)


class ArrayScanner:
    """Reads a "required" reply as it streams: `[{"name": "<name>", "parameters": <arguments>}, ...]` in the one
    layout its grammar allows (json.dumps's separators, the properties in the schema's order). feed() returns what
    each piece adds: (call index, the name where that call begins else None, the arguments' new text). Tool names
    hold no escapes ([A-Za-z0-9_-]); text that leaves the layout (a stop string cut it) ends the scan."""

    _HEAD, _MID = '{"name": "', '", "parameters": '

    def __init__(self) -> None:
        self.buf, self.state, self.calls, self.name = "", "open", 0, ""
        self.depth, self.in_string, self.escaped, self.begun = 0, False, False, False

    @property
    def whole(self) -> bool:
        """Whether the reply closed its array: every call whole."""
        return self.state == "done"

    def feed(self, new: str) -> list[tuple[int, str | None, str]]:
        if self.state in ("done", "off"):
            return []
        buf, at, events = self.buf + new, 0, []
        while at < len(buf) and self.state not in ("done", "off"):
            start = at
            if self.state == "args":
                at = self._arguments(buf, at)
                events.append((self.calls - 1, None, buf[start:at]))
                continue
            if self.state == "name":
                end = buf.find('"', at)
                if end < 0:
                    break
                self.name, at, self.state = buf[at:end], end, "mid"
                continue
            literal, then = {"open": ("[", "item"), "item": (self._HEAD, "name"), "mid": (self._MID, "args"),
                             "close": ("}", "next")}.get(self.state, ("", ""))
            if self.state == "next":
                literal, then = ("]", "done") if buf[at] == "]" else (", ", "item")
            if not buf.startswith(literal, at):
                if not literal.startswith(buf[at:]):
                    self.state = "off"
                break  # what is there may be the literal's beginning: wait for more
            at, self.state = at + len(literal), then
            if then == "args":
                events.append((self.calls, self.name, ""))
                self.calls, self.begun = self.calls + 1, False
        self.buf = buf[at:]
        return events

    def _arguments(self, buf: str, at: int) -> int:
        """Consume the arguments' JSON text from `at`; where it stopped (the state is "close" once they are whole).
        They are an object, unless the tool's schema let xgrammar drop its "type" (beside anyOf, enum, $ref...):
        then a string ends at its quote, a number, true, false or null before the item's closing brace."""
        while at < len(buf):
            c = buf[at]
            if self.in_string:
                at += 1
                self.escaped, self.in_string = (False, True) if self.escaped else (c == "\\", c != '"')
                if not self.in_string and self.depth == 0:
                    self.state = "close"
                    break
                continue
            if self.depth == 0 and self.begun and c in ",}]":  # a bare scalar ended before c
                self.state = "close"
                break
            at, self.begun = at + 1, True
            if c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.state = "close"
                    break
        return at
