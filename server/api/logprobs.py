"""The logprobs objects of the OpenAI API: the legacy completions one (tokens, token_logprobs, top_logprobs,
text_offset) and chat's (content entries with their bytes), from the engine's TokenLogprob lists."""

from __future__ import annotations

import codecs
import functools
import re
from typing import Any

from hotlora.server.api.state import AppState
from hotlora.server.engine.types import RequestOutput, TokenLogprob


def piece(state: AppState, token_id: int) -> str:
    """The token decoded alone (U+FFFD for part of a character), or <id> for a model without a tokenizer."""
    return state.tokenizer.decode([token_id]) if state.tokenizer is not None else f"<{token_id}>"


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's (GPT-2's) alphabet: one printable character per byte, back to the byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(moved)}


@functools.lru_cache(maxsize=4)
def _byte_level(tok: Any) -> bool:
    """Whether the tokenizer decodes with byte-level BPE (asked once per tokenizer, not per logprob entry)."""
    return type(getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)).__name__ == "ByteLevel"


def token_bytes(state: AppState, token_id: int, text: str) -> list[int]:
    """The token's own bytes (OpenAI's `bytes`: joined, they rebuild a character split over tokens, each of which
    decodes to U+FFFD alone): byte-level BPE spells them in its alphabet, SentencePiece as <0xNN>."""
    tok = state.tokenizer
    raw = tok.convert_ids_to_tokens(token_id) if tok is not None else None
    if isinstance(raw, str) and raw:
        chars = _byte_level_chars()
        if _byte_level(tok) and all(c in chars for c in raw):
            return [chars[c] for c in raw]
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", raw):
            return [int(raw[3:5], 16)]
    return list(text.encode())  # text: the token decoded alone


# one token of a completions logprobs object: id, its logprob and alternatives (None for the first prompt token)
Entry = tuple[int, float | None, list[tuple[int, float]] | None]


def entries(lps: list[TokenLogprob] | None) -> list[Entry]:
    return [(lp.token_id, lp.logprob, lp.top) for lp in lps or []]


def prompt_entries(ids: list[int], lps: list[TokenLogprob | None]) -> list[Entry]:
    return [(i, None, None) if lp is None else (lp.token_id, lp.logprob, lp.top)
            for i, lp in zip(ids, lps, strict=True)]


def output_offsets(outs: list[RequestOutput], start: int) -> list[int]:
    """text_offset of each generated token: where the text its output added begins, counted from `start`. A token
    holding part of a character adds no text until the character completes, so offsets follow the text returned
    (streamed or not), not the lengths of tokens decoded alone."""
    offsets = []
    for out in outs:
        offsets += [start] * len(out.logprobs or [])
        start += len(out.new_text)
    return offsets


def prompt_offsets(state: AppState, ids: list[int]) -> list[int]:
    """text_offset of each echoed prompt token in the prompt's text: the characters its bytes complete before it
    (a token decoded alone may be a U+FFFD standing for part of a character, which the text does not hold)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    offsets, at = [], 0
    for i in ids:
        offsets.append(at)
        at += len(decoder.decode(bytes(token_bytes(state, i, piece(state, i)))))
    return offsets


def _top(state: AppState, text: str, logprob: float | None, top: list[tuple[int, float]]) -> dict[str, float | None]:
    """The token itself first (sampled, or the prompt's), then its alternatives: up to logprobs + 1 entries, as
    OpenAI and vLLM return them. An alternative spelled as the token (another id decoding to U+FFFD, say) does
    not replace its logprob."""
    alternatives = {piece(state, i): v for i, v in top}
    return {text: logprob} | {k: v for k, v in alternatives.items() if k != text}


def completion_logprobs(state: AppState, entries: list[Entry] | None, offsets: list[int]) -> dict[str, Any] | None:
    """OpenAI's legacy logprobs object, with each entry's text offset."""
    if entries is None:
        return None
    tokens = [piece(state, token) for token, _, _ in entries]
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [None if top is None else _top(state, text, lp, top)
                         for text, (_, lp, top) in zip(tokens, entries, strict=True)],
        "text_offset": offsets,
    }


def chat_logprobs(state: AppState, lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if lps is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = piece(state, token_id)
        return {"token": text, "logprob": logprob, "bytes": token_bytes(state, token_id, text)}

    return {
        "content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(i, v) for i, v in lp.top]} for lp in lps]
    }
