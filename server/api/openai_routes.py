"""POST /v1/completions, POST /v1/chat/completions, GET /v1/models (OpenAI shapes)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from hotlora.adapters.mixspec import MixError, is_mix, parse_mix
from hotlora.adapters.names import NAME_RE
from hotlora.adapters.s3store import S3AdapterStore
from hotlora.server.api import generation as gen
from hotlora.server.api import logprobs as lpo
from hotlora.server.api import tools
from hotlora.server.api.errors import APIError, bad_request, model_not_found
from hotlora.server.api.schemas import ChatCompletionRequest, CompletionRequest
from hotlora.server.api.state import AppState
from hotlora.server.engine.types import RequestOutput, TokenLogprob

router = APIRouter()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.hotlora
    state.require_ready()
    return state


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # json.dumps would build one per chunk


def _sse(obj: Any) -> bytes:
    return b"data: " + _JSON.encode(obj).encode() + b"\n\n"


def _usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _Tally:
    """Usage over all choices: each prompt counts once, however many samples (n) it has."""

    def __init__(self, n: int) -> None:
        self.n, self.prompt, self.completion, self.cached = n, {}, {}, {}

    def add(self, c: gen.Choice, out: RequestOutput) -> None:
        p = c.index // self.n
        self.prompt[p] = out.prompt_tokens or len(c.request.prompt_token_ids)
        self.completion[c.index] = out.completion_tokens
        self.cached[p] = max(self.cached.get(p, 0), out.cached_tokens)  # any of the prompt's n samples

    def usage(self) -> dict[str, Any]:
        return _usage(sum(self.prompt.values()), sum(self.completion.values()), sum(self.cached.values()))


# --- shared driver -----------------------------------------------------------------------------------


async def _collect(choices: list[gen.Choice]) -> dict[int, list[RequestOutput]]:
    outs: dict[int, list[RequestOutput]] = {c.index: [] for c in choices}
    async for c, out in gen.merged(choices):
        if out.error:
            raise gen.output_error(out)
        outs[c.index].append(out)
    return outs


def _joined_logprobs(outs: list[RequestOutput]) -> list[TokenLogprob] | None:
    if all(o.logprobs is None for o in outs):
        return None
    return [lp for o in outs for lp in (o.logprobs or [])]


def _prompt_logprobs(c: gen.Choice, outs: list[RequestOutput]) -> list[lpo.Entry]:
    """The prompt's entries (echo with logprobs), from whichever output carried them ([] if none did)."""
    lps = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
    return [] if lps is None else lpo.prompt_entries(c.request.prompt_token_ids, lps)


def _usage_options(body: Any) -> tuple[bool, bool]:
    """(include_usage, continuous): vLLM's continuous_usage_stats, with include_usage, puts the usage so far in
    every chunk."""
    options = body.stream_options
    include = bool(options and options.include_usage)
    return include, include and options.continuous_usage_stats


async def _stream(
    choices: list[gen.Choice], first: list[bytes], chunk, tally: _Tally, usage: tuple[bool, bool], usage_chunk
) -> AsyncIterator[bytes]:
    include_usage, continuous = usage
    for b in first:
        yield b
    async for c, out in gen.merged(choices):
        if out.error:
            yield _sse(gen.output_error(out).body())
            break
        tally.add(c, out)
        if (out.new_text or out.finished or out.logprobs) and (data := chunk(c, out)) is not None:
            yield _sse(data | ({"usage": tally.usage()} if continuous else {}))
    else:
        if include_usage:
            yield _sse(usage_chunk(tally.usage()))
    yield b"data: [DONE]\n\n"


def _finish(out: RequestOutput) -> str | None:
    return out.finish_reason.value if out.finished and out.finish_reason is not None else None


async def _resolve_model(state: AppState, model: str) -> str | None:
    """The adapter (or adapter mix) a `model` names, None for the base. The engine says whether the
    adapters exist; malformed mixes and adapters refused at start are answered here. With the shared
    store, each named adapter is first synced to the store's current version."""
    adapter = state.adapter_for(model)
    if adapter is None:
        return None
    names = [adapter]
    if is_mix(adapter):
        try:
            names = parse_mix(adapter).names
        except MixError as exc:
            raise bad_request(str(exc), param="model", code="invalid_mix") from None
    elif "/" in adapter:
        raise model_not_found(model)
    for name in names:
        if NAME_RE.fullmatch(name):
            await state.sync_adapter(name)  # a no-op for the local store
        if name in state.refused:
            raise APIError(
                404,
                f"The model `{model}` does not exist: the adapter `{name}` in the store was refused: "
                f"{state.refused[name]}",
                param="model",
                code="model_not_found",
            )
    return adapter

async def _final_choices(
    request: Request, choices: list[gen.Choice], tally: _Tally,
    body: Callable[[gen.Choice, list[RequestOutput]], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Non-streamed answer: wait for every choice (aborting on disconnect), count usage, one dict per choice
    made of its index, `body(choice, outputs)` and its finish reason (unless the body has one)."""
    outs = await gen.until_disconnect(request, _collect(choices))
    result = []
    for c in choices:
        o = outs[c.index]
        tally.add(c, o[-1])
        entry = {"index": c.index, **body(c, o)}
        entry.setdefault("finish_reason", _finish(o[-1]))
        result.append(entry)
    return result


def _text(outs: list[RequestOutput]) -> str:
    return "".join(x.new_text for x in outs)


# --- /v1/completions -----------------------------------------------------------------------------------


async def _echoed(state: AppState, body: CompletionRequest, encoded: list[list[int]], keep: int | None
                  ) -> list[str]:
    """Each choice's echoed prompt text ("" without echo), in choice order: the prompt as sent, or the text of
    the `keep` tokens that truncate_prompt_tokens left of it (encoded: each prompt's ids before truncation).
    Decoding runs in the tokenizer pool (128 prompts of 8k tokens take ~0.2 s)."""
    if not body.echo:
        return [""] * (len(body.prompts()) * body.n)
    tok = state.tokenizer
    if tok is None:  # token-id prompts are served, but their text cannot be echoed
        raise bad_request("echo needs the prompt's text: this model has no tokenizer", param="echo")

    def texts() -> list[str]:
        out = []
        for p, ids in zip(body.prompts(), encoded, strict=True):
            kept = gen.truncated(ids, keep)
            out.append(p if isinstance(p, str) and kept is ids else tok.decode(kept))
        return out

    return [t for t in await state.tokenizers.run(texts) for _ in range(body.n)]


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = _state(request)
    body.refuse_unsupported()
    keep = gen.truncation(state, body.truncate_prompt_tokens)
    adapter = await _resolve_model(state, body.model)
    encoded = await gen.encode_prompts(state, body.prompts())
    prompts = [(ids, gen.check_length(state, len(ids), body.max_tokens))
               for ids in (gen.truncated(e, keep) for e in encoded)]
    echo = await _echoed(state, body, encoded, keep)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    bad_words = await gen.bad_words_ids(state, body.bad_words)
    choices = gen.make_choices(prompts, body, body.logprobs, adapter, rid, bad_words)
    await gen.submit(state, choices, body.model, body.structured_field)
    head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
    tally = _Tally(body.n)
    if body.stream:
        usage = _usage_options(body)
        extra = {"usage": None} if usage[0] else {}
        # echo with logprobs: the prompt goes out with the first token, once its logprobs exist
        late_echo = body.echo and body.logprobs is not None
        offsets: dict[int, int] = {c.index: 0 if late_echo else len(echo[c.index]) for c in choices}

        def chunk(c: gen.Choice, out: RequestOutput) -> dict[str, Any]:
            text, entries = out.new_text, None if out.logprobs is None else lpo.entries(out.logprobs)
            at = lpo.output_offsets([out], offsets[c.index])
            if late_echo and out.prompt_logprobs is not None:
                ids, text = c.request.prompt_token_ids, echo[c.index] + text
                at = lpo.prompt_offsets(state, ids) + lpo.output_offsets([out], len(echo[c.index]))
                entries = lpo.prompt_entries(ids, out.prompt_logprobs) + (entries or [])
            lp = lpo.completion_logprobs(state, entries, at)
            offsets[c.index] += len(text)
            return head | {
                "choices": [{"index": c.index, "text": text, "logprobs": lp, "finish_reason": _finish(out)}]
            } | extra

        first = [_sse(head | {"choices": [{"index": c.index, "text": echo[c.index], "logprobs": None,
                                           "finish_reason": None}]} | extra)
                 for c in choices if echo[c.index] and not late_echo]
        return StreamingResponse(
            _stream(choices, first, chunk, tally, usage, lambda u: head | {"choices": [], "usage": u}),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )

    def choice_body(c: gen.Choice, o: list[RequestOutput]) -> dict[str, Any]:
        joined = _joined_logprobs(o)
        offsets = lpo.output_offsets(o, len(echo[c.index]))
        if body.echo and joined is not None:  # the prompt's entries first, offsets from the echoed prompt's start
            prompt = _prompt_logprobs(c, o)
            at = lpo.prompt_offsets(state, c.request.prompt_token_ids[: len(prompt)])
            lp = lpo.completion_logprobs(state, prompt + lpo.entries(joined), at + offsets)
        else:
            lp = lpo.completion_logprobs(state, None if joined is None else lpo.entries(joined), offsets)
        return {"text": echo[c.index] + _text(o), "logprobs": lp}

    result = await _final_choices(request, choices, tally, choice_body)
    return JSONResponse(head | {"choices": result, "usage": tally.usage(), "system_fingerprint": None})


# --- /v1/chat/completions ------------------------------------------------------------------------------


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = _state(request)
    body.refuse_unsupported()
    plan = tools.plan(body.tools, body.tool_choice, body.parallel_tool_calls, state.tool_parser)
    keep = gen.truncation(state, body.truncate_prompt_tokens)
    adapter = await _resolve_model(state, body.model)
    messages = [tools.template_message(m) for m in body.messages]
    ids = await gen.chat_prompt_ids(state, messages, body.add_generation_prompt, body.continue_final_message,
                                    plan.template_tools() if plan else None)
    ids = gen.truncated(ids, keep)
    max_tokens = gen.check_length(state, len(ids), body.max_new_tokens,
                                  "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    top = (body.top_logprobs or 0) if body.logprobs else None
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    bad_words = await gen.bad_words_ids(state, body.bad_words)
    choices = gen.make_choices([(ids, max_tokens)], body, top, adapter, rid, bad_words)
    await gen.submit(state, choices, body.model, body.structured_field)
    head = {"id": rid, "created": created, "model": body.model, "system_fingerprint": None}
    tally = _Tally(body.n)
    if body.stream:
        usage = _usage_options(body)
        extra = {"usage": None} if usage[0] else {}
        obj = {"object": "chat.completion.chunk"}
        streams = {c.index: tools.ToolStream(plan) for c in choices}

        def body_of(index: int, delta: dict[str, Any], logprobs: Any, finish: str | None) -> dict[str, Any]:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return head | obj | {"choices": [choice]} | extra

        def chunk(c: gen.Choice, out: RequestOutput) -> dict[str, Any] | None:
            delta, finish = streams[c.index].feed(out.new_text, _finish(out))
            logprobs = lpo.chat_logprobs(state, out.logprobs)
            return body_of(c.index, delta, logprobs, finish) if delta or logprobs or finish else None

        first = [_sse(body_of(c.index, {"role": "assistant", "content": ""}, None, None)) for c in choices]
        return StreamingResponse(
            _stream(choices, first, chunk, tally, usage, lambda u: head | obj | {"choices": [], "usage": u}),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )

    def answer(_c: gen.Choice, o: list[RequestOutput]) -> dict[str, Any]:
        message, finish = tools.final_message(plan, _text(o), _finish(o[-1]))
        return {"message": message, "logprobs": lpo.chat_logprobs(state, _joined_logprobs(o)), "finish_reason": finish}

    result = await _final_choices(request, choices, tally, answer)
    return JSONResponse(head | {"object": "chat.completion", "choices": result, "usage": tally.usage()})


# --- /v1/models ----------------------------------------------------------------------------------------


async def model_cards(state: AppState) -> list[dict[str, Any]]:
    """What /v1/models lists: the base model, then every adapter (the registry's, and the shared store's)."""
    engine = state.engine.engine
    infos = await state.engine.call(engine.registry.info)
    names = [a.name for a in infos]
    if isinstance(state.store, S3AdapterStore):  # the shared store's names, also those not loaded here yet
        names = sorted(set(names) | set(await asyncio.to_thread(state.store.list)))
    created = int(time.time())
    base = {
        "id": state.model_name,
        "object": "model",
        "created": created,
        "owned_by": "hotlora",
        "root": state.model_name,
        "parent": None,
        "max_model_len": state.max_model_len,
    }
    adapters = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "hotlora",
            "root": name,
            "parent": state.model_name,
        }
        for name in names
    ]
    return [base, *adapters]


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": await model_cards(_state(request))}


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request):
    """One model's card (OpenAI's retrieve; any name of the base model gives its card), or a 404 in OpenAI's shape."""
    state = _state(request)
    wanted = state.model_name if state.adapter_for(model) is None else model
    card = next((c for c in await model_cards(state) if c["id"] == wanted), None)
    if card is None:
        raise model_not_found(model)
    return card
