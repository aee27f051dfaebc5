"""allowed_token_ids and bad_words inside the engine, on the default model: greedy with allowed_token_ids is
the argmax among them at every step by transformers' logits of the same model; a bad word's token sequence
never appears, and the output is the unrestricted one up to where the word would have been completed; a row
that the masks leave empty fails its request rather than emit a forbidden token."""

from __future__ import annotations

import json

import pytest
import torch
from engine_reference import default_engine, load_base

from hotlora.server.engine.engine import InvalidRequestError, LLMEngine
from hotlora.server.engine.token_rules import NO_TOKEN_LEFT
from hotlora.server.engine.types import ErrorKind, Request, SamplingParams, StructuredSpec

STORY = "Once upon a time, in a small village,"  # greedy: " there was a wise old w|izard named El|w|es. El|w|es ..."
N = 12


@pytest.fixture(scope="module")
def engine(hotlora_cache) -> LLMEngine:
    return default_engine(hotlora_cache, {})


def _greedy(engine: LLMEngine, rid: str, prompt: str, **params) -> list[int]:
    """One request alone (so that its logits are those of the unrestricted run until they part), EOS ignored."""
    req = Request(rid, engine.tokenizer.encode(prompt), SamplingParams(max_tokens=N, temperature=0.0,
                                                                       ignore_eos=True, **params))
    (out,) = engine.generate([req])
    assert out.error is None, out.error
    return out.new_token_ids


def test_greedy_with_allowed_token_ids_is_the_argmax_among_them(engine, default_model_dir):
    tok = engine.tokenizer
    words = [" cat", " dog", " the", " and", ",", ".", " a", " was", " sat"]
    allowed = sorted({tok.encode(w, add_special_tokens=False)[0] for w in words})
    prompt = "The quick brown fox"
    free = _greedy(engine, "free", prompt)
    got = _greedy(engine, "allowed", prompt, allowed_token_ids=allowed)
    assert set(got) <= set(allowed) and not set(free) <= set(allowed)  # the restriction changed the output
    ids = tok.encode(prompt)
    with torch.inference_mode():
        logits = load_base(default_model_dir, "none")(input_ids=torch.tensor([ids + got])).logits[0].float()
    for k, token in enumerate(got):  # the logits that predicted generated token k, over the allowed ids only
        row = logits[len(ids) - 1 + k, allowed]
        assert row.max() - logits[len(ids) - 1 + k, token] < 1e-3, (k, token, allowed[int(row.argmax())])


def _first(haystack: list[int], needle: list[int]) -> int | None:
    return next((i for i in range(len(haystack) - len(needle) + 1) if haystack[i : i + len(needle)] == needle), None)


@pytest.mark.parametrize("word", ["wise", "wizard", "Elwes"])  # one token, two (" w|izard"), three (" El|w|es")
def test_bad_words_never_appear_and_change_nothing_before(engine, word):
    """Under asynchronous scheduling (which the CPU engine runs when told to): a word of several tokens reads the
    output on the host, so its steps must wait for their tokens, or the ban would look at a placeholder."""
    tok = engine.tokenizer
    spaced = tok.encode(" " + word, add_special_tokens=False)
    engine.async_scheduling = True
    try:
        free = _greedy(engine, "free", STORY)
        banned = _greedy(engine, "banned", STORY, bad_words_ids=[tok.encode(word, add_special_tokens=False), spaced])
    finally:
        engine.async_scheduling = False
    at = _first(free, spaced)
    assert at is not None, (word, tok.decode(free))  # the premise: the unrestricted output holds the word
    last = at + len(spaced) - 1  # the word's tokens before the last are still generated; its last is not
    assert banned[:last] == free[:last] and banned[last] != free[last]
    assert _first(banned, spaced) is None and _first(banned, tok.encode(word, add_special_tokens=False)) is None
    assert word not in tok.decode(banned)


def test_masks_that_leave_no_token_fail_the_request(engine):
    tok = engine.tokenizer
    yes_no = StructuredSpec("choice", json.dumps(["yes", "no"]))
    cat = tok.encode(" cat", add_special_tokens=False)
    reqs = [Request("g", tok.encode("Yes or no?"), SamplingParams(max_tokens=4, temperature=0.0, allowed_token_ids=cat,
                                                                  structured=yes_no)),
            Request("ok", tok.encode("Yes or no?"), SamplingParams(max_tokens=4, temperature=0.0,
                                                                   allowed_token_ids=cat, ignore_eos=True))]
    failed, fine = engine.generate(reqs)
    assert failed.error == NO_TOKEN_LEFT and failed.error_kind is ErrorKind.INVALID and not failed.new_token_ids
    assert failed.completion_tokens == 0  # the forbidden token it drew is not counted as generated
    assert fine.error is None and fine.new_token_ids == cat * 4
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("params, param", [
    (dict(allowed_token_ids=[1, 49152]), "allowed_token_ids"),
    (dict(bad_words_ids=[[1, 2], [49152]]), "bad_words"),
    (dict(allowed_token_ids=[5, 6], bad_words_ids=[[6], [5], [7, 8]]), "bad_words"),
])
def test_refused_before_anything_runs(engine, params, param):
    assert engine.model_config.vocab_size == 49152
    with pytest.raises(InvalidRequestError) as refused:
        engine.add_request(Request("r", [1, 2, 3], SamplingParams(**params)))
    assert refused.value.param == param and not engine.scheduler.has_unfinished() and "r" not in engine.seqs
