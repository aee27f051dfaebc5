"""What a request's sampling may never produce: tokens outside its allowed_token_ids, and its bad words (vLLM's
sampling parameters). Pure Python: the API tokenizes bad words with this, the logits processors read the index
to mask them (server/model/logits.py), and the engine checks every sampled token against it.

A bad word is a token id sequence. Its last token is banned whenever the generated output so far ends with
the tokens before it (a one-token word: always), as vLLM's: only the output counts, so a word whose first tokens
end the prompt is not caught at the first generated token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hotlora.server.engine.memo import PerObject

NO_TOKEN_LEFT = ("no token is left to generate at this point: the request's allowed_token_ids, bad_words and "
                 "structured output (where it has one) together exclude every token")


def bad_words_ids(encode: Callable[[str], list[int]], words: Sequence[str]) -> list[list[int]]:
    """Each word's token ids, as at the start of a text and after a space (a BPE tokenizer gives a word in
    the middle of a text other tokens: " word"). vLLM adds the spaced form only when it has as many tokens as the
    plain one, which misses the mid-text form of words such as "described" (1 token spaced, 2 plain:
    vllm-project/vllm#23886); here it is added whenever it differs. Raises ValueError, naming the word, for one
    that has no tokens."""
    out: list[list[int]] = []
    for word in words:
        plain = list(encode(word.lstrip()))
        if not plain:
            raise ValueError(f"bad word {word!r} has no tokens")
        out.append(plain)
        spaced = list(encode(" " + word.lstrip()))
        if spaced and spaced != plain:
            out.append(spaced)
    return out


@dataclass(slots=True)
class BadWords:
    """A request's bad words, indexed once: the tokens always banned, and the longer words by the token
    before their last (so that a step looks up the output's last token, not every word)."""

    words: Sequence[Sequence[int]]
    single: frozenset[int] = field(init=False)
    # a word's next-to-last token -> (its tokens before the last, the banned last token)
    by_next_to_last: dict[int, list[tuple[list[int], int]]] = field(init=False)
    longest: int = field(init=False)  # tokens before the last, at most

    def __post_init__(self) -> None:
        self.single = frozenset(w[0] for w in self.words if len(w) == 1)
        self.by_next_to_last = {}
        for w in self.words:
            if len(w) > 1:
                self.by_next_to_last.setdefault(w[-2], []).append((list(w[:-1]), w[-1]))
        self.longest = max((len(w) - 1 for w in self.words), default=0)

    def banned_after(self, output: Sequence[int]) -> list[int]:
        """The last tokens of the longer words whose other tokens end `output` (a list, or an int64 tensor of
        the generated ids): banned at the next token, besides `single`."""
        if not self.by_next_to_last or not len(output):
            return []
        candidates = self.by_next_to_last.get(int(output[-1]))
        if not candidates:
            return []
        tail = output[-self.longest :]
        tail = tail.tolist() if hasattr(tail, "tolist") else list(tail)
        return [last for before, last in candidates if tail[len(tail) - len(before) :] == before]

    def completes(self, ids: Sequence[int], start: int, end: int, token: int) -> bool:
        """Whether `token`, generated after ids[start:end] (the output so far), completes a bad word."""
        if token in self.single:
            return True
        return token in self.banned_after(ids[max(start, end - self.longest) : end])


@dataclass(slots=True)
class TokenRules:
    """The engine's check of a sampled token: a token outside allowed_token_ids, or one completing a bad word, is
    sampled only when the masks left the row no token at all (the grammar, allowed_token_ids and bad_words
    exclude every token), and the request must fail rather than emit it."""

    allowed: frozenset[int] | None
    bad: BadWords | None

    def forbid(self, ids: Sequence[int], start: int, end: int, token: int) -> bool:
        """Whether `token` may not follow ids[start:end] (the output so far)."""
        if self.allowed is not None and token not in self.allowed:
            return True
        return self.bad is not None and self.bad.completes(ids, start, end, token)


def _span(ids: Sequence[int]) -> tuple[int, int]:
    return (min(ids), max(ids)) if ids else (0, 0)


# built once per list object (every choice of an API request shares its lists; memo.py says what it saved)
bad_words_index = PerObject(BadWords)
_allowed_set = PerObject(frozenset)
_allowed_span = PerObject(_span)
_bad_span = PerObject(lambda words: _span([t for w in words for t in w]))
_bias_span = PerObject(lambda bias: _span(list(bias)))


def token_rules(allowed_token_ids: Sequence[int] | None, bad_words: Sequence[Sequence[int]]) -> TokenRules | None:
    """A request's TokenRules, or None when it sets neither parameter."""
    if allowed_token_ids is None and not bad_words:
        return None
    return TokenRules(None if allowed_token_ids is None else _allowed_set(allowed_token_ids),
                      bad_words_index(bad_words) if bad_words else None)


def refusal(allowed_token_ids: Sequence[int] | None, bad_words: Sequence[Sequence[int]], vocab: int,
            logit_bias: dict[int, float] | None = None) -> tuple[str, str] | None:
    """(message, parameter) when the engine must refuse a request's token lists: an id outside [0, vocab) (in
    logit_bias, allowed_token_ids or bad_words), or bad words that ban every allowed token (every row of the
    request would be empty); else None."""
    for name, span in (("logit_bias", _bias_span(logit_bias) if logit_bias else (0, 0)),
                       ("allowed_token_ids", _allowed_span(allowed_token_ids) if allowed_token_ids else (0, 0)),
                       ("bad_words", _bad_span(bad_words) if bad_words else (0, 0))):
        if not 0 <= span[0] <= span[1] < vocab:
            return f"{name} token ids must be in [0, {vocab}) for this model", name
    if allowed_token_ids is not None and bad_words and (
            _allowed_set(allowed_token_ids) <= bad_words_index(bad_words).single):
        return "bad_words ban every token of allowed_token_ids: no token is left to generate", "bad_words"
    return None
