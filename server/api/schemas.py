"""OpenAI request bodies (pydantic). Unknown fields are refused, never silently ignored.

Fields OpenAI defines but the engine cannot honour (best_of, suffix, store...) are accepted only at
their neutral value; anything else is a 400 naming the field. Tools are in server/api/tools.py, chat messages in
server/api/chat_messages.py.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator, model_validator

from hotlora.server.api.chat_messages import ChatMessage
from hotlora.server.api.errors import bad_request
from hotlora.server.api.strict import Strict as _Strict
from hotlora.server.api.tools import Tool, ToolChoice, constraint, tool_choice
from hotlora.server.engine.types import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    StructuredSpec,
)

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_PROMPTS = 128  # prompts in one /v1/completions request
MAX_CHOICES = 256  # prompts x n in one request
MAX_BAD_WORDS = 128  # words in bad_words; each is tokenized in two forms (engine: at most 256 sequences)
MAX_BAD_WORD_CHARS = 256
# A token id: strict, so that `true` is not token 1; bounded, so that it fits every tensor index type.
TokenId = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]


_SCALARS = frozenset({int, float, bool, type(None)})


def _valid_unicode(data: Any) -> bool:
    """Whether every string in parsed JSON encodes as UTF-8. It runs on the event loop over bodies of up to
    --max-body-bytes, so it stays cheap: a list of numbers is passed over in one C-level scan of its types, and
    no path is built (a body of 2.7M token ids took 2.4 s with the paths built for every element)."""
    stack = [data]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is str:
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return False
        elif kind is dict:
            stack += value.keys()
            stack += value.values()
        elif kind is list and not _SCALARS.issuperset(map(type, value)):
            stack += value
    return True


def _check_unicode(data: Any) -> None:
    """Refuse strings that cannot be encoded as UTF-8 (lone surrogates such as "\\ud800", which JSON allows),
    naming where the first one is. Iterative: a deeply nested body must not turn into a RecursionError (a 500)."""
    if _valid_unicode(data):
        return
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"{where or 'a string'} holds invalid Unicode (a lone surrogate); send valid UTF-8 text"
                ) from None
        elif isinstance(value, dict):
            stack += [(k, where) for k in value]
            stack += [(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(value)]


class _Body(_Strict):
    """A request body: every string in it valid Unicode, checked once on the raw JSON (so that the message says
    what is wrong), not again for each nested model (a chat body of 250,000 content parts took 4.4 s so)."""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data


def _null_is_default(cls: type[BaseModel], v: Any, info: ValidationInfo) -> Any:
    """A before-validator for fields OpenAI's spec lets be null (n, stream, echo, chat's logprobs), as vLLM's
    Optional fields: null means the default."""
    return cls.model_fields[info.field_name].default if v is None else v


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def spec(self) -> StructuredSpec | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredSpec("json_object", "")
        if self.json_schema is None:
            raise bad_request("response_format type json_schema needs a json_schema", param="response_format")
        return StructuredSpec("json", _canonical(self.json_schema.schema_))


class StructuredOutputs(_Strict):
    """vLLM's structured_outputs: exactly one of json (a schema), regex, choice, grammar (EBNF), json_object."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1, max_length=1024)
    grammar: str | None = None
    json_object: bool | None = None
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    def spec(self) -> StructuredSpec:
        given = {k: v for k, v in (("json", self.json_), ("regex", self.regex), ("choice", self.choice),
                                   ("grammar", self.grammar), ("json_object", self.json_object or None))
                 if v is not None}
        if len(given) != 1:
            raise bad_request("structured_outputs takes exactly one of json, regex, choice, grammar, json_object; "
                              f"got {sorted(given) or 'none'}", param="structured_outputs")
        kind, value = next(iter(given.items()))
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise bad_request(f"structured_outputs.json is not valid JSON: {exc}",
                                      param="structured_outputs") from None
            return StructuredSpec("json", _canonical(value))
        if kind == "choice":
            return StructuredSpec("choice", json.dumps(value))
        return StructuredSpec(kind, "" if kind == "json_object" else value)


def _canonical(schema: Any) -> str:
    """The schema as compact JSON, the grammar cache's key. Key order is kept: an object's properties are
    generated in the order the schema lists them (as OpenAI and vLLM do), so it is part of the spec."""
    if not isinstance(schema, dict):
        raise bad_request("a JSON schema must be an object", param="response_format")
    return json.dumps(schema, separators=(",", ":"))


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    # int64, as OpenAI documents it; choice j of n samples with seed + j, wrapped into int64
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    # token id (a string key, as JSON objects have) -> bias added to its logit
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(default=None, max_length=300)
    user: str | None = None
    # vLLM extensions, honoured by the engine
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=64)
    priority: StrictInt = Field(default=0, ge=-INT32_MAX - 1, le=INT32_MAX)  # vLLM's: lower first (--scheduling-policy)
    allowed_token_ids: list[TokenId] | None = Field(default=None, min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS)
    bad_words: list[Annotated[str, Field(min_length=1, max_length=MAX_BAD_WORD_CHARS)]] | None = Field(
        default=None, max_length=MAX_BAD_WORDS)
    # keep the prompt's last k tokens; -1: the model's context length (vLLM's)
    truncate_prompt_tokens: StrictInt | None = Field(default=None, ge=-1, le=INT32_MAX)

    _nullable = field_validator("n", "stream", mode="before")(_null_is_default)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncation(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("truncate_prompt_tokens must be -1 (the model's context length) or at least 1")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.isascii() or not key.isdigit() or int(key) > INT32_MAX:
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers as strings), got {key!r}")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:  # as OpenAI and vLLM: not silently ignored
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def structured_field(self) -> str:
        """The field the request's structured-output spec comes from (its errors name it)."""
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    def structured_spec(self) -> StructuredSpec | None:
        rf = self.response_format.spec() if self.response_format is not None else None
        if self.structured_outputs is not None:
            if rf is not None:
                raise bad_request("send response_format or structured_outputs, not both", param="structured_outputs")
            return self.structured_outputs.spec()
        return rf

    def token_bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def refuse_unsupported(self) -> None:
        """Fields of OpenAI's that the server does not implement: a 400 naming the field."""

    def prompt_logprobs(self) -> int | None:
        """How many alternatives to return per prompt token, or None for no prompt logprobs."""
        return None


class CompletionRequest(_Sampling):
    # tried in this order, the first that fits wins (a list of ids is not first validated as strings: on a body
    # of 2.7M ids that collected an error per id, 1.5 s on the event loop)
    prompt: (
        str
        | list[TokenId]
        | Annotated[list[str], Field(max_length=MAX_PROMPTS)]
        | Annotated[list[list[TokenId]], Field(max_length=MAX_PROMPTS)]
    ) = Field(union_mode="left_to_right")
    max_tokens: int | None = Field(default=16, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None
    _nullable_echo = field_validator("echo", mode="before")(_null_is_default)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_count(cls, v: Any) -> Any:
        """Say what is wrong before the union's per-branch errors would (one per prompt)."""
        if isinstance(v, list) and len(v) > MAX_PROMPTS and not isinstance(v[0], int):
            raise ValueError(f"{len(v)} prompts: at most {MAX_PROMPTS} prompts are accepted in one request")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        # the union is homogeneous: only a list of id lists can hold an empty prompt (no walk over a prompt's ids)
        if isinstance(v, list) and (not v or (isinstance(v[0], list) and not all(v))):
            raise ValueError("the prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _choices(self) -> CompletionRequest:
        prompts = 1 if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else len(self.prompt)
        if prompts * self.n > MAX_CHOICES:
            raise ValueError(f"{prompts} prompts x n={self.n} is more than {MAX_CHOICES} choices in one request")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def prompt_logprobs(self) -> int | None:
        """echo with logprobs returns the prompt's logprobs too (as OpenAI's legacy completions and vLLM)."""
        return self.logprobs if self.echo else None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported by this server", param="best_of")
        if self.suffix:
            raise bad_request("suffix is not supported by this server", param="suffix")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    _nullable_logprobs = field_validator("logprobs", mode="before")(_null_is_default)
    _tool_choice = field_validator("tool_choice", mode="before")(classmethod(lambda cls, v: tool_choice(v)))

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @functools.cached_property
    def _tool_spec(self) -> StructuredSpec | None:
        """The tool choice's constraint, built once (it copies every tool's schema)."""
        return constraint(self.tools, self.tool_choice, self.parallel_tool_calls)

    @property
    def structured_field(self) -> str:
        return "tools" if self._tool_spec is not None else super().structured_field

    def structured_spec(self) -> StructuredSpec | None:
        """A tool choice's schema ("required", a named function), or the request's structured-output spec."""
        spec, own = self._tool_spec, super().structured_spec()
        if spec is not None and own is not None:
            raise bad_request(f"send tool_choice or {super().structured_field}, not both", param="tool_choice")
        return spec or own

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.store:  # (metadata tags stored completions: with none stored, it is accepted and has no effect)
            raise bad_request("store=true is not supported by this server: it keeps no completions", param="store")
        if self.service_tier not in (None, "auto", "default"):
            raise bad_request(f"service_tier {self.service_tier!r} is not supported by this server: it has one tier, "
                              "'default'", param="service_tier")
        if self.continue_final_message and self.add_generation_prompt:
            raise bad_request(
                "continue_final_message needs add_generation_prompt=false", param="continue_final_message"
            )
