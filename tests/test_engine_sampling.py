"""The sampler's processors and grammars inside the engine, on the default model with peft adapters: a
seeded request draws the same tokens whatever shares its batch (other processors, grammars, adapters),
and a grammar's state survives preemption and recompute."""

from __future__ import annotations

import json

import jsonschema
import pytest
from engine_reference import default_engine, drain

from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams, StructuredSpec

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "n"], "additionalProperties": False}
JSON = StructuredSpec("json", json.dumps(SCHEMA))
MAX = 40


@pytest.fixture(scope="module")
def engine(hotlora_cache, adapters) -> LLMEngine:
    return default_engine(hotlora_cache, adapters)


def _requests(tok, tag: str) -> list[Request]:
    ids = tok.encode("Describe a cat as JSON:")
    specs = [
        (SamplingParams(max_tokens=8, temperature=1.0, seed=7), "qv8"),
        (SamplingParams(max_tokens=8, temperature=0.8, seed=8, repetition_penalty=1.3, frequency_penalty=0.7,
                        presence_penalty=0.4), "all16"),
        (SamplingParams(max_tokens=24, temperature=1.0, seed=9, structured=JSON), None),
        (SamplingParams(max_tokens=8, temperature=1.2, seed=10, min_p=0.05, logit_bias={11: 2.0}, min_tokens=4),
         "mlp4rs"),
        (SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.5), "ku12"),
    ]
    return [Request(f"{tag}{i}", ids, p, a) for i, (p, a) in enumerate(specs)]


def test_each_request_draws_the_same_tokens_alone_or_batched(engine):
    batched = drain(engine, {0: _requests(engine.tokenizer, "b")})
    for i, req in enumerate(_requests(engine.tokenizer, "s")):
        assert drain(engine, {0: [req]})[req.request_id] == batched[f"b{i}"], i
    text = engine.tokenizer.decode(batched["b2"][:-1])  # the last token is EOS
    jsonschema.validate(json.loads(text), SCHEMA)


def test_grammar_state_survives_preemption(engine, hotlora_cache, adapters):
    ids = engine.tokenizer.encode("Describe a cat as JSON:")
    reqs = [Request(f"g{i}", ids, SamplingParams(max_tokens=MAX, temperature=1.0, seed=i, structured=JSON),
                    "qv8" if i % 2 else None) for i in range(4)]
    roomy = drain(engine, {0: reqs})
    small = default_engine(hotlora_cache, adapters, num_kv_blocks=14, block_size=4, max_num_batched_tokens=8)
    cramped = drain(small, {0: [Request(r.request_id, r.prompt_token_ids, r.params, r.adapter) for r in reqs]})
    assert small.scheduler.num_preemptions > 0
    assert cramped == roomy
    for toks in cramped.values():
        if toks[-1] in small.eos_ids:  # else the grammar could not finish within max_tokens ("length")
            jsonschema.validate(json.loads(small.tokenizer.decode(toks[:-1])), SCHEMA)
        else:
            assert len(toks) == MAX


def test_a_grammar_ends_the_request_before_min_tokens(engine):
    """min_tokens masks EOS, but a finished grammar allows nothing else: the grammar wins, the output stays
    valid (no token outside the grammar is drawn), and the request ends with "stop"."""
    ids = engine.tokenizer.encode("Yes or no?")
    choice = StructuredSpec("choice", json.dumps(["yes", "no"]))
    reqs = [Request(f"m{i}", ids, SamplingParams(max_tokens=8, temperature=1.0, seed=i, structured=choice,
                                                 min_tokens=6), "qv8" if i % 2 else None) for i in range(4)]
    for out in engine.generate(reqs):
        assert out.error is None and out.finish_reason.value == "stop"
        assert out.new_text in ("yes", "no") and out.new_token_ids[-1] in engine.eos_ids
        assert engine.tokenizer.decode(out.new_token_ids[:-1]) == out.new_text
