"""POST /tokenize, POST /detokenize (vLLM's shapes) and GET /v1/models/{model} (OpenAI's retrieve) on a real server:
the default model with the hermes-style chat template of test_server_tools.py and an adapter. Token ids must be
transformers' own, and a conversation's count what /v1/chat/completions charges for it."""

from __future__ import annotations

import json

import openai
import pytest
from server_harness import assert_openai_error
from test_server_tools import ASK, TOOLS, server, tokenizer_dir  # noqa: F401 (the fixtures, this module's own copies)
from transformers import AutoTokenizer

PROMPT = "The three primary colors are red, yellow and"
HISTORY = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):  # noqa: F811
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:  # noqa: F811
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def test_a_prompt_tokenizes_as_transformers_does_and_decodes_back(http, tok, server):  # noqa: F811
    r = http.post("/tokenize", json={"prompt": PROMPT})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens"] == tok(PROMPT).input_ids and out["count"] == len(out["tokens"]) > 5
    assert out["max_model_len"] == 1024 and out["token_strs"] is None
    plain = http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False, "return_token_strs": True,
                                         "model": "a"}).json()
    assert plain["tokens"] == tok(PROMPT, add_special_tokens=False).input_ids
    assert plain["token_strs"] == tok.convert_ids_to_tokens(plain["tokens"])
    back = http.post("/detokenize", json={"tokens": plain["tokens"], "model": server.state.model_name})
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_a_conversation_counts_what_chat_completions_charge(http, client, tok):
    """The conversation, its tool calls and the tools rendered by the chat template: the ids transformers gives, and
    as many as the chat completion's prompt_tokens (base and adapter)."""
    r = http.post("/tokenize", json={"model": "a", "messages": HISTORY, "tools": TOOLS})
    assert r.status_code == 200, r.text
    reference = [dict(m) for m in HISTORY]
    reference[1] = {**HISTORY[1], "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris",
                                                                                              "days": 3}}}]}
    text = tok.apply_chat_template(reference, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert r.json()["tokens"] == tok.encode(text, add_special_tokens=False)
    for model in ("a", client.models.list().data[0].id):
        chat = client.chat.completions.create(model=model, messages=HISTORY, tools=TOOLS, tool_choice="none",
                                              max_tokens=1)
        assert chat.usage.prompt_tokens == r.json()["count"]
    bare = http.post("/tokenize", json={"messages": ASK, "add_generation_prompt": False}).json()
    assert bare["tokens"] == tok.encode(tok.apply_chat_template(ASK, tokenize=False), add_special_tokens=False)
    assert client.chat.completions.create(model="a", messages=ASK, max_tokens=1).usage.prompt_tokens > bare["count"]


def test_every_name_of_the_base_model_is_taken(http, client, server):  # noqa: F811
    """The names the completion routes take for the base (--served-model-name and the model's own) are taken here;
    a mix must name adapters only, as the completion routes answer."""
    for alias in server.state.aliases:
        assert http.post("/tokenize", json={"prompt": "hi", "model": alias}).status_code == 200
        assert client.models.retrieve(alias).id == server.state.model_name
        for mix in (f"{alias}+a", f"{alias}*0.5"):
            assert_openai_error(http.post("/tokenize", json={"prompt": "hi", "model": mix}), 404, "not an adapter")


def test_a_model_is_retrieved_by_name(client, server):  # noqa: F811
    base = server.state.model_name
    adapter = client.models.retrieve("a")
    assert (adapter.id, adapter.object, adapter.owned_by) == ("a", "model", "hotlora")
    assert adapter.model_dump()["parent"] == base
    assert client.models.retrieve(base).id == base
    assert {m.id for m in client.models.list().data} == {base, "a"}
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert err.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("path, body, status, match", [
    ("/tokenize", {}, 400, "either prompt or messages"),
    ("/tokenize", {"prompt": "x", "messages": ASK}, 400, "either prompt or messages"),
    ("/tokenize", {"prompt": "x", "tools": TOOLS}, 400, "go with messages"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "temperature": 1}, 400, "temperature"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "does not exist"),
    ("/tokenize", {"prompt": "x", "model": "a+nope"}, 404, "nope"),
    ("/tokenize", {"messages": ASK, "tools": TOOLS + TOOLS[:1]}, 400, "share a function name"),
    ("/detokenize", {"tokens": [-1]}, 400, "greater than or equal to 0"),
    ("/detokenize", {"tokens": [10**9]}, 400, "outside the vocabulary"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
    ("/detokenize", {"tokens": [True, 5]}, 400, "tokens"),
    ("/tokenize", {"messages": ASK, "continue_final_message": True}, 400, "needs add_generation_prompt=false"),
    ("/detokenize", {"tokens": [1], "model": "nope"}, 404, "does not exist"),
])
def test_bad_input_is_an_openai_error(http, path, body, status, match):
    assert_openai_error(http.post(path, json=body), status, match)


def test_text_too_long_to_fit_is_refused_before_it_is_tokenized(http, server):  # noqa: F811
    too_long = "x" * (server.state.tokenizers.max_chars + 1)
    for body in ({"prompt": too_long}, {"messages": [{"role": "user", "content": too_long}]}):
        assert_openai_error(http.post("/tokenize", json=body), 400, "cannot fit")
