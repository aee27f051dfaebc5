"""How tool_choice "auto" finds the calls a model wrote in its own format (server/api/tools.py uses them).

Each parser says where in a whole reply the calls begin (the text before them is content), reads the calls from
there, and, while a reply streams, how much of the text not sent yet may go out as content.
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks anywhere in the reply (Qwen2/2.5,
  Hermes and many fine-tunes).
- llama3_json: a reply that is one JSON object `{"name": ..., "parameters": {...}}`, or several separated by `;`,
  optionally after `<|python_tag|>` (Llama 3.1 and 3.2's JSON tool calling).
"""

from __future__ import annotations

import json
import re
from typing import Any


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


class Llama3JsonParser:
    TAG = "<|python_tag|>"

    def begin(self, text: str) -> int:
        body = text.lstrip()
        return 0 if body.startswith(("{", self.TAG)) else -1

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
            if not rest:
                return found
            if not rest.startswith(";"):
                raise ValueError("text after a call")
            at = len(body) - len(rest) + 1

    def release(self, pending: str, sent: int) -> tuple[int, bool]:
        if sent:  # the reply began as text: it is content to the end
            return len(pending), False
        body = pending.lstrip()
        if body.startswith(("{", self.TAG)):
            return 0, True
        if not body or self.TAG.startswith(body):  # not decided yet
            return 0, False
        return len(pending), False


FORMATS: dict[str, HermesParser | Llama3JsonParser] = {"hermes": HermesParser(), "llama3_json": Llama3JsonParser()}
# what a chat template holds when the model writes that format (checked in this order)
_SIGNS = (("hermes", HermesParser.START), ("llama3_json", Llama3JsonParser.TAG))


def detect(chat_template: Any) -> str | None:
    """The format a chat template's model writes its calls in, or None."""
    text = str(chat_template or "")
    return next((name for name, sign in _SIGNS if sign in text), None)
