"""What structured outputs refuse in a JSON schema (server/model/grammar.py `unenforced`): each keyword xgrammar
compiles without enforcing. The probe that found them is kept here: for each refused construct, xgrammar's own
grammar accepts a value that breaks it (if a new xgrammar enforces one, its case fails and the refusal can go),
and for each construct it does enforce, the breaking value is rejected."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string

from hotlora.server.model.grammar import unenforced

INTS = {"type": "array", "items": {"type": "integer"}}
DROPPED = {  # schema, a value that breaks it (JSON as xgrammar writes it without free whitespace)
    "uniqueItems": (INTS | {"uniqueItems": True}, "[1, 1]"),
    "contains": (INTS | {"contains": {"const": 42}}, "[1]"),
    "not": ({"type": "integer", "not": {"const": 1}}, "1"),
    "if": ({"type": "integer", "if": {"minimum": 5}, "then": {"maximum": 6}}, "9"),
    "dependentRequired": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, '{"a": 1}'),
    "minLength/maxLength beside a pattern": ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 2}, '"abcd"'),
    "format 'iri'": ({"type": "string", "format": "iri"}, '"%% ^^"'),
    "allOf with more than one schema": ({"allOf": [{"type": "integer"}, {"maximum": 2}]}, "5"),
}
ENFORCED = {
    "bounds": ({"type": "integer", "minimum": 0, "maximum": 2}, "5"),
    "maxItems": (INTS | {"maxItems": 1}, "[1, 2]"),
    "additionalProperties": ({"type": "object", "properties": {"a": {"type": "integer"}},
                              "additionalProperties": False}, '{"b": 1}'),
    "format 'email'": ({"type": "string", "format": "email"}, '"x"'),
    "pattern": ({"type": "string", "pattern": "^[a-z]+$"}, '"AB"'),
    "a $ref": ({"$defs": {"n": {"type": "integer", "maximum": 1}}, "$ref": "#/$defs/n"}, "5"),
}


def _accepts(schema: dict, value: str) -> bool:
    return _is_grammar_accept_string(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False), value)


@pytest.mark.parametrize("name", DROPPED)
def test_what_xgrammar_does_not_enforce_is_refused(name):
    schema, bad = DROPPED[name]
    assert _accepts(schema, bad)  # xgrammar's grammar lets the breaking value through
    found = unenforced({"type": "object", "properties": {"x": schema}, "required": ["x"]})  # nested, found too
    assert found is not None and name.split()[0].strip("'") in found.replace("'", "")


@pytest.mark.parametrize("name", ENFORCED)
def test_what_xgrammar_enforces_is_let_through(name):
    schema, bad = ENFORCED[name]
    assert not _accepts(schema, bad)
    assert unenforced(schema) is None


def test_keyword_names_as_data_or_property_names_are_not_keywords():
    schema = {"type": "object", "properties": {"not": {"type": "string"}, "contains": {"enum": ["uniqueItems"]}},
              "required": ["not"], "$defs": {"if": {"const": {"uniqueItems": True}}}}
    assert unenforced(schema) is None
    assert unenforced({"anyOf": [{"type": "integer"}, {"type": "array", "items": [{"uniqueItems": True}]}]})
