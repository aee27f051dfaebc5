"""vLLM/OpenAI sampling fields through HTTP with the official openai client, on a real uvicorn server over
the default model: logit_bias, min_tokens, the penalties, min_p, allowed_token_ids, bad_words,
truncate_prompt_tokens, and their 400s."""

from __future__ import annotations

import re
from collections import Counter

import openai
import pytest
from server_harness import ServerThread, assert_openai_error, server_settings, wait_idle

REPETITIVE = "a, a, a, a, a, a, a, a,"


@pytest.fixture(scope="module")
def server(tmp_path_factory, hotlora_cache):
    srv = ServerThread(server_settings(tmp_path_factory.mktemp("store"), hotlora_cache, num_kv_blocks=64)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def _tokens(client: openai.OpenAI, base: str, prompt: str, max_tokens: int, **extra) -> list[str]:
    """The greedy completion's tokens (as the logprobs report them)."""
    r = client.completions.create(model=base, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0,
                                  **extra)
    return r.choices[0].logprobs.tokens


def test_logit_bias_forces_a_token(client, base, server):
    (forced,) = server.state.tokenizer.encode(" banana", add_special_tokens=False)[:1]
    r = client.completions.create(model=base, prompt="My favourite colour is", max_tokens=4, temperature=1.0,
                                  seed=3, logit_bias={str(forced): 100})
    assert r.choices[0].text == server.state.tokenizer.decode([forced] * 4)
    banned = _tokens(client, base, REPETITIVE, 4)
    ids = [server.state.tokenizer.encode(t, add_special_tokens=False)[0] for t in set(banned)]
    again = _tokens(client, base, REPETITIVE, 4, logit_bias={str(i): -100 for i in ids})
    assert not set(again) & set(banned)


def test_logit_bias_refusals(client, base, server):
    vocab = server.engine.model_config.vocab_size
    for bias, match in (({str(vocab): 1}, "logit_bias"), ({"abc": 1}, "logit_bias"), ({"5": 101}, "logit_bias"),
                        ({str(i): 1 for i in range(301)}, "logit_bias")):
        with pytest.raises(openai.BadRequestError, match=match):
            client.completions.create(model=base, prompt="hi", max_tokens=1, logit_bias=bias)


def test_min_tokens_outlasts_eos(client, base):
    messages = [{"role": "user", "content": "Answer with one word: is the sky blue?"}]
    short = client.chat.completions.create(model=base, messages=messages, max_tokens=20, temperature=0)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 10
    need = short.usage.completion_tokens + 6
    longer = client.chat.completions.create(model=base, messages=messages, max_tokens=20, temperature=0,
                                            extra_body={"min_tokens": need})
    assert longer.usage.completion_tokens >= need
    assert longer.choices[0].message.content.startswith(short.choices[0].message.content)


def test_stop_strings_wait_for_min_tokens(client, base):
    plain = client.completions.create(model=base, prompt="1, 2, 3,", max_tokens=8, temperature=0, stop=[","])
    assert plain.choices[0].finish_reason == "stop"
    need = plain.usage.completion_tokens + 1  # the first "," now comes too early to stop the request
    held = client.completions.create(model=base, prompt="1, 2, 3,", max_tokens=8, temperature=0, stop=[","],
                                     extra_body={"min_tokens": need})
    assert held.usage.completion_tokens >= need and held.choices[0].finish_reason == "stop"
    # the stop string ended it at its first occurrence after min_tokens, not at the early one
    full = client.completions.create(model=base, prompt="1, 2, 3,", max_tokens=held.usage.completion_tokens,
                                     temperature=0)
    assert full.choices[0].text == held.choices[0].text + ","


def _most_repeated(tokens: list[str]) -> int:
    return Counter(tokens).most_common(1)[0][1]


def test_penalties_move_repetition_in_the_documented_direction(client, base):
    n = 8
    plain = _tokens(client, base, REPETITIVE, n)
    assert _most_repeated(plain) >= n // 2  # the premise: the prompt makes the model repeat itself
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 2.0}}):
        penalised = _tokens(client, base, REPETITIVE, n, **extra)
        assert _most_repeated(penalised) < _most_repeated(plain), extra
        assert len(set(penalised)) > len(set(plain)), extra
    rewarded = _tokens(client, base, REPETITIVE, n, frequency_penalty=-2.0)
    assert _most_repeated(rewarded) >= _most_repeated(plain)


def test_min_p_one_is_greedy(client, base):
    greedy = client.completions.create(model=base, prompt="The capital of France is", max_tokens=5, temperature=0)
    for seed in (1, 2):
        r = client.completions.create(model=base, prompt="The capital of France is", max_tokens=5, temperature=1.5,
                                      seed=seed, extra_body={"min_p": 1.0})
        assert r.choices[0].text == greedy.choices[0].text


@pytest.mark.parametrize("extra", [{"frequency_penalty": 2.5}, {"presence_penalty": -3},
                                   {"extra_body": {"repetition_penalty": 0}}, {"extra_body": {"min_p": 1.5}},
                                   {"extra_body": {"min_tokens": 9}}])
def test_out_of_range_is_400(client, base, extra):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=base, prompt="hi", max_tokens=4, **extra)


@pytest.mark.parametrize("extra", [{"extra_body": {"suffix": "x"}}, {"extra_body": {"best_of": 3}}])
def test_unsupported_fields_are_refused(client, base, extra):
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model=base, prompt="hi", max_tokens=1, **extra)


def test_echo_returns_the_prompt_first(client, base, server):
    plain = client.completions.create(model=base, prompt="The sea is", max_tokens=3, temperature=0)
    echoed = client.completions.create(model=base, prompt=["The sea is", "Hi"], max_tokens=3, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "The sea is" + plain.choices[0].text
    assert echoed.choices[1].text.startswith("Hi")
    ids = server.state.tokenizer.encode("The sea is", add_special_tokens=False)
    by_ids = client.completions.create(model=base, prompt=ids, max_tokens=3, temperature=0, echo=True)
    assert by_ids.choices[0].text == echoed.choices[0].text
    stream = client.completions.create(model=base, prompt="The sea is", max_tokens=3, temperature=0, echo=True,
                                       stream=True)
    texts = [c.choices[0].text for c in stream if c.choices]
    assert texts[0] == "The sea is" and "".join(texts) == echoed.choices[0].text


def test_echo_with_logprobs_scores_the_prompt(client, base, server):
    prompt, tok = "The sea is deep and", server.state.tokenizer
    ids = tok.encode(prompt, add_special_tokens=False)
    n = len(ids)
    kw = dict(model=base, prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    plain = client.completions.create(**kw).choices[0]
    echoed = client.completions.create(echo=True, **kw).choices[0]
    lp = echoed.logprobs
    assert echoed.text == prompt + plain.text
    assert lp.tokens == [tok.decode([i]) for i in ids] + plain.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(0 < len(t) <= 3 for t in lp.top_logprobs[1:])
    # each token's own logprob leads its alternatives (OpenAI: "up to logprobs+1 elements"), sampled or prompt
    assert all(next(iter(t.items())) == (s, v) for s, v, t in zip(lp.tokens[1:], lp.token_logprobs[1:],
                                                                   lp.top_logprobs[1:], strict=True))
    assert lp.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # independently: the last prompt token's logprob is what the server reports when it is forced to generate
    # that token after the rest of the prompt (logprobs are the model's own, before logit_bias)
    forced = client.completions.create(model=base, prompt=ids[:-1], max_tokens=1, temperature=0, logprobs=0,
                                       logit_bias={str(ids[-1]): 100}).choices[0]
    assert forced.logprobs.tokens == [lp.tokens[n - 1]]
    assert lp.token_logprobs[n - 1] == pytest.approx(forced.logprobs.token_logprobs[0], abs=1e-4)
    # streamed: the prompt and its logprobs come with the first token, then the rest as usual
    chunks = [c.choices[0] for c in client.completions.create(echo=True, stream=True, **kw) if c.choices]
    assert chunks[0].text.startswith(prompt) and chunks[0].logprobs.tokens[: n + 1] == lp.tokens[: n + 1]
    assert "".join(c.text for c in chunks) == echoed.text
    streamed = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == lp.text_offset


def test_text_offsets_follow_the_text_where_tokens_split_characters(client, base, server):
    """Tokens holding part of a character (each decodes alone to U+FFFD) add no text until it completes: every
    offset indexes the returned text, the prompt's are where its text stands before each token, and streamed
    and non-streamed offsets agree."""
    prompt, tok = "Party time: 🎉🎉🎉 and 🦜", server.state.tokenizer
    ids = tok.encode(prompt, add_special_tokens=False)
    assert sum(tok.decode([i]) == "\ufffd" for i in ids) >= 4  # the emoji are split over tokens
    kw = dict(model=base, prompt=prompt, max_tokens=8, temperature=0, logprobs=0, echo=True,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    offsets = whole.logprobs.text_offset
    assert offsets[: len(ids)] == [len(tok.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]
    assert offsets == sorted(offsets) and offsets[-1] <= len(whole.text) and offsets[len(ids)] == len(prompt)
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == offsets


# --- vLLM's allowed_token_ids, bad_words and truncate_prompt_tokens, on both routes ------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
FRANCE = "The capital of France is"


def _text(client: openai.OpenAI, base: str, route: str, stream: bool, max_tokens: int = 8, **extra) -> str:
    """The greedy reply's text on `route`, streamed or not; `extra`: vLLM's fields."""
    kw = dict(model=base, max_tokens=max_tokens, temperature=0, stream=stream, extra_body=extra)
    if route == "completions":
        r = client.completions.create(prompt=FRANCE, **kw)
        return "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text
    r = client.chat.completions.create(messages=QUESTION, **kw)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    return r.choices[0].message.content


ROUTES = [("completions", False), ("completions", True), ("chat", False), ("chat", True)]


@pytest.mark.parametrize("route, stream", ROUTES)
def test_allowed_token_ids_are_all_that_is_generated(client, base, server, route, stream):
    tok = server.state.tokenizer
    allowed = sorted({tok.encode(w, add_special_tokens=False)[0] for w in (" yes", " no", "yes", "no")})
    text = _text(client, base, route, stream, max_tokens=5, allowed_token_ids=allowed)
    assert re.fullmatch(r"( ?(yes|no)){5}", text), text  # no EOS among them: it runs to max_tokens


@pytest.mark.parametrize("route, stream", ROUTES)
def test_bad_words_are_not_generated(client, base, route, stream):
    free = _text(client, base, route, stream)
    word = re.findall(r"[A-Za-z]{4,}", free)[0]  # "Paris" after FRANCE, "capital" in the chat reply
    banned = _text(client, base, route, stream, bad_words=[word])
    cut = free.index(word)
    assert word not in banned and banned.startswith(free[:cut].rstrip()), (free, banned)


def _usage(client: openai.OpenAI, base: str, route: str, stream: bool, **extra) -> openai.types.CompletionUsage:
    kw = dict(model=base, max_tokens=2, temperature=0, extra_body=extra)
    if stream:
        kw |= dict(stream=True, stream_options={"include_usage": True})
    if route == "completions":
        r = client.completions.create(prompt="A long prompt about the sea and the ships on it", **kw)
    else:
        r = client.chat.completions.create(messages=QUESTION, **kw)
    return list(r)[-1].usage if stream else r.usage


@pytest.mark.parametrize("route, stream", ROUTES)
def test_truncate_prompt_tokens_keeps_the_last_k(client, base, route, stream):
    assert _usage(client, base, route, stream).prompt_tokens > 6
    assert _usage(client, base, route, stream, truncate_prompt_tokens=6).prompt_tokens == 6
    assert _usage(client, base, route, stream, truncate_prompt_tokens=500).prompt_tokens < 500  # short: whole
    assert _usage(client, base, route, stream, truncate_prompt_tokens=-1) == _usage(client, base, route, stream)


def test_a_truncated_prompt_is_its_last_tokens(client, base, server):
    """The same completion as the last k ids sent as the prompt, and echo returns the text of those k."""
    ids = server.state.tokenizer.encode("Tell me about the sea. The capital of France is", add_special_tokens=False)
    k = 6
    by_ids = client.completions.create(model=base, prompt=ids[-k:], max_tokens=6, temperature=0).choices[0].text
    cut = client.completions.create(model=base, prompt=server.state.tokenizer.decode(ids), max_tokens=6,
                                    temperature=0, echo=True, extra_body={"truncate_prompt_tokens": k})
    assert cut.choices[0].text == server.state.tokenizer.decode(ids[-k:]) + by_ids and cut.usage.prompt_tokens == k


def _refusals(server) -> list[tuple[dict, str]]:
    yes = server.state.tokenizer.encode("yes", add_special_tokens=False)
    vocab = server.engine.model_config.vocab_size
    return [({"allowed_token_ids": []}, "allowed_token_ids"), ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
            ({"allowed_token_ids": [vocab]}, "allowed_token_ids"), ({"allowed_token_ids": [1] * 4097},
                                                                    "allowed_token_ids"),
            ({"allowed_token_ids": [True]}, "allowed_token_ids"), ({"bad_words": [""]}, "bad_words"),
            ({"bad_words": ["   "]}, "bad_words"), ({"bad_words": "Paris"}, "bad_words"),
            ({"bad_words": ["x"] * 129}, "bad_words"), ({"bad_words": ["yes"], "allowed_token_ids": yes}, "bad_words"),
            ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
            ({"truncate_prompt_tokens": 513}, "truncate_prompt_tokens"),
            ({"truncate_prompt_tokens": 2.5}, "truncate_prompt_tokens"),
            ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens")]


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_bad_values_are_400_naming_the_field(server, base, http, route):
    prompt = {"prompt": FRANCE} if route == "completions" else {"messages": QUESTION}
    for fields, param in _refusals(server):
        for stream in (False, True):
            r = http.post(f"/v1/{route}", json={"model": base, "max_tokens": 2, "stream": stream, **prompt, **fields})
            err = assert_openai_error(r, 400)
            assert (err["param"] or "").split(".")[0] == param, (fields, err)
    assert wait_idle(server).num_waiting == 0  # nothing was queued or left holding blocks


def test_masks_that_leave_no_token_are_a_400(server, base, http):
    """allowed_token_ids outside what a grammar allows: the request fails once it runs, never emitting a token."""
    cat = server.state.tokenizer.encode(" cat", add_special_tokens=False)
    body = {"model": base, "prompt": "Yes or no?", "max_tokens": 3, "allowed_token_ids": cat,
            "structured_outputs": {"choice": ["yes", "no"]}}
    err = assert_openai_error(http.post("/v1/completions", json=body), 400, "no token is left")
    assert err["type"] == "invalid_request_error"
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert "no token is left" in events[0] and events[-1] == "data: [DONE]" and len(events) == 2
