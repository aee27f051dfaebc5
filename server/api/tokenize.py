"""POST /tokenize and POST /detokenize, in vLLM's shapes: a prompt (or a conversation, rendered by the chat template
exactly as /v1/chat/completions renders it) to its token ids, and token ids back to text. Every adapter shares the
base model's tokenizer; a `model`, when given, must be one GET /v1/models lists (or a mix of them)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field, model_validator

from hotlora.adapters.mixspec import is_mix, parse_mix
from hotlora.server.api import generation as gen
from hotlora.server.api import tools
from hotlora.server.api.errors import bad_request, model_not_found
from hotlora.server.api.openai_routes import _resolve_model, _state, model_cards
from hotlora.server.api.schemas import ChatMessage, TokenId
from hotlora.server.api.state import AppState
from hotlora.server.api.strict import Strict
from hotlora.server.api.tools import Tool

router = APIRouter()


class TokenizeRequest(Strict):
    """A `prompt`, or `messages` with the chat fields of /v1/chat/completions (vLLM's two tokenize requests)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=4096)
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=128)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template has them)
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt=false")
        if self.prompt is not None and (self.tools is not None or not self.add_generation_prompt
                                        or self.continue_final_message):
            raise ValueError("tools, add_generation_prompt and continue_final_message go with messages")
        return self


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[TokenId] = Field(max_length=1 << 20)


async def _check_model(state: AppState, model: str | None) -> None:
    """A 4xx unless `model` is absent or passes the completion routes' checks (a name of the base model, a mix
    that parses, no adapter refused at start) and each adapter it names is one /v1/models lists."""
    adapter = None if model is None else await _resolve_model(state, model)
    if adapter is None:
        return
    adapters = {c["id"] for c in await model_cards(state)} - {state.model_name}
    names = parse_mix(adapter).names if is_mix(adapter) else [adapter]  # a mix _resolve_model has parsed already
    unknown = next((n for n in names if n not in adapters), None)
    if unknown is not None:
        raise model_not_found(model, unknown)


def _tokenizer(state: AppState) -> Any:
    if state.tokenizer is None:
        raise bad_request("this model has no tokenizer", param="model")
    return state.tokenizer


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    state = _state(request)
    await _check_model(state, body.model)
    tok = _tokenizer(state)
    if body.prompt is not None:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        (ids,) = await gen.encode_prompts(state, [body.prompt], add_special_tokens=add)
    else:
        plan = tools.plan(body.tools, "none", None, None)
        ids = await gen.chat_prompt_ids(state, [tools.template_message(m) for m in body.messages],
                                        body.add_generation_prompt, body.continue_final_message,
                                        plan.template_tools() if plan else None, bool(body.add_special_tokens))
    strs = await state.tokenizers.run(lambda: tok.convert_ids_to_tokens(ids)) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    state = _state(request)
    await _check_model(state, body.model)
    tok = _tokenizer(state)

    def decode() -> str:  # in the worker pool: the ids' check walks them all, as the decode does
        vocab = len(tok)
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (0 to {vocab - 1})", param="tokens")
        return tok.decode(body.tokens)

    return {"prompt": await state.tokenizers.run(decode)}
