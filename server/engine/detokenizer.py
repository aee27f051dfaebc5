"""Incremental detokenization with stop strings.

Text is only released once it is final: never half a multi-byte character (the tokenizer shows
those as U+FFFD until the rest of the bytes arrive), never the beginning of a stop string that
may still complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hotlora.server.engine.sequence import Sequence


@dataclass(slots=True)
class DetokState:
    emitted: int = 0  # characters of the decoded text already released
    stop_start: int = 0  # a stop string must end after this character (the text of the first min_tokens tokens)
    text: str = ""  # the decoded text of ids[:read]
    prefix: int = 0  # ids[prefix:read] are decoded again beside the new ids: the context for their spacing
    read: int = 0

    def advance(self, decode: Callable[[list[int]], str], ids: list[int], final: bool) -> str:
        """The text of all of `ids`, decoding only the ids since the last call and the chunk before them
        (vLLM's offsets): a step costs the same at token 10 and at token 4,000. The text of an incomplete
        multi-byte character (U+FFFD at the end) waits for the ids that complete it, unless final."""
        if len(ids) > self.read:
            before = decode(ids[self.prefix : self.read])
            after = decode(ids[self.prefix :])
            if len(after) > len(before) and (final or not after.endswith("\ufffd")):
                self.text += after[len(before) :]
                self.prefix, self.read = self.read, len(ids)
        return self.text


_PROBE = 16  # characters compared before a candidate's whole length


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string.

    Only the suffixes that start with the stop's first character are tried, longest first, each compared on
    _PROBE characters before its whole length: trying every length with endswith cost O(len(stop)**2) a
    step (16 stops of 60,000 characters slowed every other stream 19x)."""
    best = 0
    for stop in stops:
        end = len(text) - best  # a suffix must start before this to beat best
        i = text.find(stop[0], max(0, len(text) - len(stop) + 1), end)
        while i >= 0:
            if stop.startswith(text[i : i + _PROBE]) and stop.startswith(text[i:]):
                best = len(text) - i
                break
            i = text.find(stop[0], i + 1, end)
    return best


class Detokenizer:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def update(self, seq: Sequence, final: bool, drop_last: bool, end: int | None = None) -> tuple[str, bool]:
        """New text of `seq` since the last call, and whether a stop string ended it.

        drop_last leaves the newest token (a stop token id or EOS) out of the text. end: only the tokens
        before this index count (later ones are placeholders of steps in flight); None: all of them.
        """
        state: DetokState = seq.detok
        generated = seq.token_ids[seq.num_prompt : end]
        ids = generated[:-1] if drop_last else generated
        text = state.advance(self.decode, ids, final)
        # as vLLM: a stop string counts only where it ends in the text of a token after the first min_tokens
        # (it may start before); its beginning is held back all along, so that no released text needs taking back
        stops = seq.params.stop
        counting = stops if len(generated) > seq.params.min_tokens else []
        if not counting:
            state.stop_start = len(text)
        stopped = False
        if counting:
            window = max(0, state.emitted - max(len(s) for s in stops))
            starts = [max(window, state.stop_start - len(s) + 1) for s in stops]
            hits = [i for i in (text.find(s, w) for s, w in zip(stops, starts, strict=True)) if i >= 0]
            if hits:
                text, stopped = text[: min(hits)], True
        end = len(text)
        if not (final or stopped):
            end = len(text.rstrip("\ufffd"))
            end -= _held_back(text[:end], stops)
        end = max(end, state.emitted)
        new = text[state.emitted : end]
        state.emitted = end
        return new, stopped
