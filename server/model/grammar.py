"""Structured outputs with xgrammar (the library vLLM and SGLang use): specs compiled once, off the engine
thread, and cached by a hash of the spec; one matcher per sequence, advanced with each accepted token; the
next-token bitmask applied to the logits on the device."""

from __future__ import annotations

import json
import re
import threading
import time
import weakref
from typing import Any

import torch
import xgrammar as xgr

from hotlora.server.engine.types import StructuredSpec


class InvalidGrammarError(ValueError):
    """The schema, regex, choice list or grammar cannot be compiled (the API answers 400)."""


# xgrammar's C++ errors start with "[hh:mm:ss] /project/cpp/file.cc:123: ": where it failed, not what is wrong
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")


def _reason(exc: Exception) -> str:
    """The first line of an xgrammar error, without its C++ source location, at most 500 characters."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return _CPP_PREFIX.sub("", lines[0])[:500]


# JSON-schema keywords xgrammar (0.2.x) compiles without enforcing them, found by compiling a schema with each and
# testing a value that breaks it (tests/test_json_schema_enforcement.py keeps that probe): refused with a 400, as vLLM's
# xgrammar backend refuses them, rather than answered with output that breaks the schema
_DROPPED = ("uniqueItems", "contains", "minContains", "maxContains", "not", "if", "then", "else",
            "dependentRequired", "dependentSchemas")
_FORMATS = {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri",
            "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"}  # the formats it enforces
# where a schema holds schemas: one, a list of them, or a map of names to them (anything else is data or a name)
_ONE = ("items", "additionalItems", "additionalProperties", "propertyNames", "unevaluatedItems",
        "unevaluatedProperties", "contains", "not", "if", "then", "else")
_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def unenforced(schema: Any) -> str | None:
    """The first use in `schema` of what xgrammar would compile without enforcing it, described; None if none."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        dropped = next((k for k in _DROPPED if k in node), None)
        if dropped is not None:
            return f"'{dropped}'"
        if "format" in node and node["format"] not in _FORMATS:
            return f"format {node['format']!r}"
        if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
            return "minLength/maxLength beside a pattern or format"
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            return "'allOf' with more than one schema"
        stack += [node[k] for k in _ONE if k in node]
        stack += [v for k in _LISTS if isinstance(node.get(k), list) for v in node[k]]
        stack += [v for k in _MAPS if isinstance(node.get(k), dict) for v in node[k].values()]
    return None


class GrammarCache:
    """Compiled grammars by spec hash. compile() is thread-safe: the API calls it from worker threads."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int], max_entries: int = 256) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        # least recently used first: a hit moves to the end, the first entry goes when full (so a grammar the
        # API just compiled is still here when the engine thread makes the request's matcher)
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def compile(self, spec: StructuredSpec) -> Any:
        """The xgr.CompiledGrammar for spec; raises InvalidGrammarError saying what is wrong."""
        with self._lock:
            hit = self._cache.pop(spec.key, None)
            if hit is not None:
                self._cache[spec.key] = hit
        if hit is not None:
            return hit
        try:
            compiled = self._compile(spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidGrammarError(f"invalid {spec.kind}: {_reason(exc)}") from None
        with self._lock:
            self._cache[spec.key] = compiled
            while len(self._cache) > self.max_entries:
                self._cache.pop(next(iter(self._cache)))
        return compiled

    def _compile(self, spec: StructuredSpec) -> Any:
        c = self._compiler
        if spec.kind == "json_object":  # OpenAI's json_object is an object, not any JSON value
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if spec.kind == "json":
            dropped = unenforced(json.loads(spec.value))
            if dropped is not None:
                raise ValueError(f"the schema uses {dropped}, which structured outputs cannot enforce")
            return c.compile_json_schema(spec.value, any_whitespace=False)
        if spec.kind == "regex":
            return c.compile_regex(spec.value)
        if spec.kind == "choice":
            # a grammar of string literals: JSON string escapes are valid EBNF literal escapes
            alternatives = " | ".join(json.dumps(s) for s in json.loads(spec.value))
            return c.compile_grammar(f"root ::= {alternatives}")
        return c.compile_grammar(spec.value)

    def matcher(self, spec: StructuredSpec) -> Any:
        return xgr.GrammarMatcher(self.compile(spec))


# Host CPU time (of the engine thread, so a busy machine does not count) that one row's mask may take. A grammar
# can compile fast and still cost seconds a token: "(.{0,200}){50}" grew to 4 s a token within 50 tokens and
# slowed every other stream of the server from 33 ms to 5 s a token. Past the budget its request fails (a 400).
FILL_BUDGET_S = 0.25
_costly: dict[int, weakref.ref] = {}  # id -> the matcher, of those whose mask went past FILL_BUDGET_S (unhashable)


def _mark_costly(matcher: Any) -> None:
    key = id(matcher)
    _costly[key] = weakref.ref(matcher, lambda _: _costly.pop(key, None))


def too_costly(matcher: Any) -> bool:
    """Whether filling this matcher's mask went past FILL_BUDGET_S (apply_grammars records it)."""
    ref = _costly.get(id(matcher))
    return ref is not None and ref() is matcher


def allows_no_token(matcher: Any, vocab_size: int) -> bool:
    """Whether the matcher forbids every token now: a grammar that can match nothing (an empty character class,
    `root ::= root`) compiles, and its all-masked row still samples some token, which the matcher rejects."""
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    return not bool(bitmask.any())


def apply_grammars(logits: torch.Tensor, matchers: list[Any | None]) -> torch.Tensor:
    """logits [R, V] with every token the row's grammar forbids at -inf (rows without one untouched).
    Returns a new tensor when any row has a grammar (the input may be a CUDA graph's static output)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[-1])
    for i in rows:  # the matchers live on the host: filling each row's mask is CPU work, as in vLLM
        began = time.thread_time()
        matchers[i].fill_next_token_bitmask(bitmask, i)
        if time.thread_time() - began > FILL_BUDGET_S:
            _mark_costly(matchers[i])
    logits = logits.float().contiguous().clone()
    # the rows as a device tensor: given a list, xgrammar's CUDA path copies it with a blocking copy, which
    # waits for the step's forward
    index = torch.tensor(rows, dtype=torch.int32).to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=index)
    return logits
