"""From an OpenAI body to engine requests and back: tokenize, check lengths, fan out n x prompts,
merge the output streams, map engine exceptions to OpenAI errors, abort on client disconnect."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HTTPRequest

from hotlora.server.api.errors import APIError, bad_request, model_not_found
from hotlora.server.api.metrics import RequestTimer
from hotlora.server.api.state import AppState
from hotlora.server.engine import token_rules
from hotlora.server.engine.async_engine import RequestStream
from hotlora.server.engine.types import ErrorKind, Request, RequestOutput, SamplingParams, StructuredSpec

# The largest JSON schema (compact JSON) compiled for a request: xgrammar's compile time grows faster than the
# schema (a union of 128 objects of 40 optional fields, 159 KiB: 3 s of a core; 1.2 MiB: 137 s), and a compile
# cannot be stopped once begun, even after its client has gone.
MAX_SCHEMA_CHARS = 128 << 10


@dataclass(slots=True)
class Choice:
    """One engine request: choice `index` of the response."""

    index: int
    request: Request
    stream: RequestStream | None = None
    timer: RequestTimer | None = None


def engine_error(exc: BaseException, model: str) -> APIError | None:
    """The API error for an exception the engine raised on a request, or None for a bug."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "UnknownAdapterError" in names:
        return model_not_found(model, getattr(exc, "name", None))
    if "EngineOverloadedError" in names:
        return APIError(
            429, f"the server is overloaded ({exc}); retry later", code="overloaded", headers={"Retry-After": "1"}
        )
    if "EngineDeadError" in names:
        return APIError(503, str(exc), code="unavailable")
    if "AdapterError" in names or "MixError" in names:  # a mix the engine refuses (summed rank too large)
        return bad_request(str(exc), param="model", code="invalid_mix")
    if "PromptTooLongError" in names:
        return bad_request(str(exc), param="prompt", code="context_length_exceeded")
    if isinstance(exc, ValueError):
        return bad_request(str(exc), param=getattr(exc, "param", None))
    return None


async def encode_prompts(state: AppState, prompts: list[str | list[int]],
                         add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each prompt; text is tokenized in the worker pool, as one job for the request."""
    texts = [p for p in prompts if isinstance(p, str)]
    if not texts:
        return [list(p) for p in prompts]  # type: ignore[arg-type]
    state.tokenizers.check(texts, state.max_model_len, "prompt")
    return await state.tokenizers.run(
        lambda: [encode(state, p, add_special_tokens) if isinstance(p, str) else list(p) for p in prompts]
    )


async def chat_prompt_ids(
    state: AppState,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: list[dict[str, Any]] | None = None,
    add_special_tokens: bool = False,
) -> list[int]:
    """The templated conversation's token ids, rendered and tokenized in the worker pool (the template writes the
    special tokens it wants: add_special_tokens adds the tokenizer's own too, as /tokenize may ask)."""
    sized = [m["content"] for m in messages] + [json.dumps(m["tool_calls"]) for m in messages if "tool_calls" in m]
    state.tokenizers.check(["".join(sized) + (json.dumps(tools) if tools else "")], state.max_model_len, "messages")
    return await state.tokenizers.run(
        lambda: chat_prompt(state, messages, add_generation_prompt, continue_final_message, tools, add_special_tokens)
    )


def encode(state: AppState, text: str, add_special_tokens: bool = True) -> list[int]:
    if state.tokenizer is None:
        raise bad_request("this model has no tokenizer: send the prompt as a list of token ids", param="prompt")
    return list(state.tokenizer.encode(text, add_special_tokens=add_special_tokens))


def chat_prompt(
    state: AppState,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: list[dict[str, Any]] | None = None,
    add_special_tokens: bool = False,
) -> list[int]:
    tok = state.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise bad_request("this model has no chat template: use /v1/completions", param="messages")
    try:
        text = tok.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
    except Exception as exc:  # jinja raises TemplateError (or ValueError) for conversations it refuses
        raise bad_request(f"the chat template refused these messages: {exc}", param="messages") from None
    return encode(state, text, add_special_tokens=add_special_tokens)


def truncation(state: AppState, k: int | None) -> int | None:
    """vLLM's truncate_prompt_tokens, checked before any work: k, or None to keep whole prompts. A k above the
    context is a 400, as vLLM answers (one equal to it leaves no room to generate: check_length says so); -1 is
    the context length, as in vLLM."""
    if k == -1:
        return state.max_model_len
    if k is not None and k > state.max_model_len:
        raise bad_request(f"truncate_prompt_tokens ({k}) is greater than this model's maximum context length "
                          f"({state.max_model_len}); select a smaller truncation size", param="truncate_prompt_tokens")
    return k


def truncated(ids: list[int], k: int | None) -> list[int]:
    """The prompt's last k token ids (after tokenization and the chat template, as vLLM), all of them for None."""
    return ids if k is None or len(ids) <= k else ids[-k:]


async def bad_words_ids(state: AppState, words: list[str] | None) -> list[list[int]]:
    """vLLM's bad_words as token id sequences (each word in two forms: token_rules.bad_words_ids), tokenized in
    the worker pool; a 400 naming bad_words for a word with no tokens or a model without a tokenizer."""
    if not words:
        return []
    tok = state.tokenizer
    if tok is None:
        raise bad_request("bad_words need the model's tokenizer, and this model has none", param="bad_words")
    try:
        return await state.tokenizers.run(
            lambda: token_rules.bad_words_ids(lambda text: tok.encode(text, add_special_tokens=False), words))
    except ValueError as exc:
        raise bad_request(str(exc), param="bad_words") from None


def check_length(state: AppState, n_prompt: int, max_tokens: int | None, param: str = "max_tokens") -> int:
    """max_tokens to use; 400 when prompt + completion cannot fit the context (as vLLM answers), naming `param`
    (the field the client set the completion's length with)."""
    ctx = state.max_model_len
    if n_prompt >= ctx:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens. However, your prompt has "
            f"{n_prompt} tokens. Please reduce the length of the prompt.",
            param="prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return ctx - n_prompt
    if n_prompt + max_tokens > ctx:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
            "completion). Please reduce the length of the prompt or the completion.",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens


def choice_seed(seed: int | None, offset: int) -> int | None:
    """Choice j's seed: seed + j, wrapped into int64 so that every valid seed works for every n."""
    return None if seed is None else (seed + offset + 2**63) % 2**64 - 2**63


def sampling(body: Any, max_tokens: int, logprobs: int | None, seed_offset: int,
             bad_words: list[list[int]] | None = None) -> SamplingParams:
    """Choice seed_offset's engine parameters; `bad_words`: the body's bad words tokenized (bad_words_ids). The
    token lists are the same objects for every choice: the sampler builds their tensors once per object."""
    seed = choice_seed(body.seed, seed_offset)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),
            seed=seed,
            stop=list(body.stop),
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=body.prompt_logprobs(),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=body.token_bias(),
            min_p=body.min_p or 0.0,
            min_tokens=body.min_tokens,
            structured=body.structured_spec(),
            priority=body.priority,
            allowed_token_ids=body.allowed_token_ids,
            bad_words_ids=bad_words or [],
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def make_choices(
    prompts: list[tuple[list[int], int]], body: Any, logprobs: int | None, adapter: str | None, request_id: str,
    bad_words: list[list[int]] | None = None,
) -> list[Choice]:
    """n choices per (prompt token ids, max_tokens); a seeded request's j-th sample uses seed + j."""
    choices = []
    for p, (ids, max_tokens) in enumerate(prompts):
        for j in range(body.n):
            index = p * body.n + j
            params = sampling(body, max_tokens, logprobs, j, bad_words)
            choices.append(Choice(index, Request(f"{request_id}-{index}", ids, params, adapter)))
    return choices


async def submit(state: AppState, choices: list[Choice], model: str, structured_field: str) -> None:
    """Queue every choice, or none (one refused, none runs or is counted). structured_field:
    the request field its structured-output spec came from (a bad spec's 400 names it)."""
    spec = choices[0].request.params.structured if choices else None
    if spec is not None:
        await compile_grammar(state, spec, structured_field)
    try:
        streams = await state.engine.add_all([c.request for c in choices])
    except Exception as exc:
        err = engine_error(exc, model)
        if err is None:
            raise
        raise err from None
    for c, stream in zip(choices, streams, strict=True):
        c.stream = stream
        c.timer = state.metrics.timer(c.request.adapter, c.request.arrival_time)


async def compile_grammar(state: AppState, spec: StructuredSpec, param: str) -> None:
    """Compile (or find cached) the request's grammar in a worker thread: neither the event loop nor the
    engine thread waits for it; an invalid spec is a 400 saying what is wrong."""
    grammars = state.engine.engine.grammars
    if grammars is None:
        raise bad_request("structured outputs need the model's tokenizer, and this model has none")
    if spec.kind == "json" and len(spec.value) > MAX_SCHEMA_CHARS:
        raise bad_request(f"the JSON schema to enforce is {len(spec.value) >> 10} KiB; at most "
                          f"{MAX_SCHEMA_CHARS >> 10} KiB can be compiled (its compile time grows faster than its size)",
                          param=param)
    try:
        await asyncio.to_thread(grammars.compile, spec)
    except ValueError as exc:
        raise bad_request(str(exc), param=param) from None


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
    """Outputs of all choices as they come; closing this generator aborts the unfinished ones."""
    if len(choices) == 1:  # the common case, on every token of every stream: no task or wait per output
        c = choices[0]
        try:
            async for out in c.stream:
                c.timer.output(out)
                yield c, out
        finally:
            c.stream.close()
            c.timer.closed()
        return
    pending: dict[asyncio.Future, Choice] = {}

    def arm(c: Choice) -> None:
        pending[asyncio.ensure_future(c.stream.__anext__())] = c

    for c in choices:
        arm(c)
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                c = pending.pop(fut)
                out = fut.result()
                c.timer.output(out)
                yield c, out
                if not out.finished:
                    arm(c)
    finally:
        for fut in pending:
            fut.cancel()
        for c in choices:
            c.stream.close()
            c.timer.closed()


async def until_disconnect(request: HTTPRequest, work: Awaitable[Any], poll_s: float = 0.25) -> Any:
    """Await `work`, but cancel it (aborting its sequences) if the client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise APIError(499, "client disconnected", code="client_disconnected")
    finally:
        task.cancel()


def output_error(out: RequestOutput) -> APIError:
    """The error of a request the engine ended with out.error, by its kind."""
    if out.error_kind is ErrorKind.ADAPTER:
        return bad_request(f"the adapter cannot be used: {out.error}", param="model", code="invalid_adapter")
    if out.error_kind is ErrorKind.INVALID:
        return bad_request(out.error or "the request cannot be served")
    if out.error_kind is ErrorKind.SHUTDOWN:
        return APIError(503, out.error or "the server is shutting down", code="shutting_down")
    return APIError(500, f"the request failed in the engine: {out.error}", code="engine_error")
