"""The engine's public request/response types. Pure Python: shared by the engine, the API and the tests."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

from hotlora.server.engine.memo import PerObject

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # int64 and uint64; the sampler hashes a seed modulo 2**64
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
# allowed_token_ids entries: each request's ids stay on the device while it runs (8 bytes each: 32 KiB at this
# bound) and each step indexes them all; a whole vocabulary's (128K for Llama 3) would be 1 MiB a request
MAX_ALLOWED_TOKEN_IDS = 4096
MAX_BAD_WORD_SEQUENCES = 256  # token id sequences (the API tokenizes each of its at most 128 words in two forms)
MAX_REPETITION_PENALTY = 100.0  # beyond this every seen token is simply banned; a bound keeps logits finite
# and its inverse below: a seen token's logit divided by 1e-300 (0 in float32) is inf, and a row of several
# infs has a NaN softmax, which drew the last token of the vocabulary
MIN_REPETITION_PENALTY = 1 / MAX_REPETITION_PENALTY
# below this temperature a request is greedy (vLLM's _SAMPLING_EPS): logits / 1e-38 overflow float32 to inf,
# and the softmax of a row of infs is NaN, which drew the last token of the vocabulary
GREEDY_TEMPERATURE = 1e-5


class ErrorKind(str, enum.Enum):
    """Why a request failed inside the engine: the API answers each with its own status."""

    INTERNAL = "internal"  # a bug: the request could not be run
    ADAPTER = "adapter"  # its adapter could not be loaded or failed validation
    SHUTDOWN = "shutdown"  # the server is shutting down and the grace period is over
    INVALID = "invalid"  # the request asks what cannot be done: a grammar allowing no token, or costing too much (400)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length reached
    ABORT = "abort"  # aborted by the caller (client disconnect, shutdown)


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredSpec:
    """A structured-output constraint: kind and its text (a JSON schema or choice list as canonical JSON, a
    regex, an EBNF grammar; "" for json_object)."""

    kind: str
    value: str

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {STRUCTURED_KINDS}, got {self.kind!r}")

    @property
    def key(self) -> str:
        """What compiled grammars are cached by."""
        return hashlib.sha256(f"{self.kind}\0{self.value}".encode()).hexdigest()


def _check_allowed(allowed: list[int]) -> str | None:
    if not 1 <= len(allowed) <= MAX_ALLOWED_TOKEN_IDS:
        return f"allowed_token_ids must hold 1 to {MAX_ALLOWED_TOKEN_IDS} token ids, got {len(allowed)}"
    return "allowed_token_ids must be token ids >= 0" if min(allowed) < 0 else None


def _check_bad_words(words: list[list[int]]) -> str | None:
    if len(words) > MAX_BAD_WORD_SEQUENCES:
        return f"bad_words_ids has {len(words)} token sequences; at most {MAX_BAD_WORD_SEQUENCES}"
    if any(not w for w in words):
        return "bad_words_ids sequences must be non-empty"
    return "bad_words_ids must be token ids >= 0" if min(min(w) for w in words) < 0 else None


_allowed_error = PerObject(_check_allowed)
_bad_words_error = PerObject(_check_bad_words)


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling. temperature 0 (or below GREEDY_TEMPERATURE) means greedy; top_k <= 0 and top_p == 1
    disable those filters."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per token (0 = only the chosen one)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo with logprobs)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence among the generated tokens
    repetition_penalty: float = 1.0  # vLLM: divides (or multiplies, if negative) logits of prompt+generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    min_tokens: int = 0  # EOS, stop token ids and stop strings are ignored until this many tokens exist
    structured: StructuredSpec | None = None  # the output must match this grammar
    priority: int = 0  # with the "priority" scheduling policy: lower values are admitted first, preempted last
    allowed_token_ids: list[int] | None = None  # vLLM's: only these tokens may be sampled (None: any)
    # vLLM's bad_words, tokenized (token_rules.bad_words_ids): a word's last token is banned wherever the output
    # ends with its other tokens
    bad_words_ids: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if type(self.priority) is not int:
            raise ValueError(f"priority must be an integer, got {self.priority!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 20:
                raise ValueError(f"{name} must be in [0, 20], got {getattr(self, name)}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        self._check_processors()

    def _check_processors(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}], "
                             f"got {self.repetition_penalty}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are accepted")
        for token, bias in self.logit_bias.items():
            if token < 0:
                raise ValueError(f"logit_bias token ids must be >= 0, got {token}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        self._check_token_lists()

    def _check_token_lists(self) -> None:
        """allowed_token_ids and bad_words_ids: bounded, non-empty, ids >= 0 (the engine checks them against its
        vocabulary). Each list is scanned once, however many choices share it."""
        if self.allowed_token_ids is not None and (error := _allowed_error(self.allowed_token_ids)):
            raise ValueError(error)
        if self.bad_words_ids and (error := _bad_words_error(self.bad_words_ids)):
            raise ValueError(error)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def reads_history(self) -> bool:
        """A logits processor reads the request's token ids: the penalties, min_tokens' count, and bad words of
        several tokens (whether the output ends with a word's first tokens)."""
        return bool(self.repetition_penalty != 1.0 or self.frequency_penalty or self.presence_penalty
                    or self.min_tokens or (self.bad_words_ids and any(len(w) > 1 for w in self.bad_words_ids)))


@dataclass(slots=True)
class Request:
    """One generation request. `adapter` is a registered adapter name, or None for the base model."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    # time.monotonic() when the request was handed to the engine (AsyncEngine.add); 0: when add_request runs
    arrival_time: float = 0.0


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass(slots=True)
class RequestTiming:
    """When a request passed each phase inside the engine, on time.monotonic(); 0.0 = never reached.

    queued: handed to the engine; scheduled: the first step that scheduled any of its prompt tokens (a
    preemption's re-scheduling does not move it); first_token: its first output token on the host;
    finished: the engine ended it. vLLM's request phases are the differences: queue = scheduled - queued,
    prefill = first_token - scheduled, decode = finished - first_token, inference = finished - scheduled.
    """

    queued: float = 0.0
    scheduled: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0


@dataclass(slots=True)
class RequestOutput:
    """What one engine step produced for one request: the text and tokens new since the last output."""

    request_id: str
    new_text: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    # with params.prompt_logprobs, on the output of the first generated token: one entry per prompt token,
    # None for the first (nothing predicts it), as vLLM's RequestOutput.prompt_logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    error: str | None = None  # set when the request failed inside the engine (e.g. its adapter failed to load)
    error_kind: ErrorKind | None = None  # with error: what kind of failure
    timing: RequestTiming | None = None  # on the finished output only: the request's phase timestamps

    def absorb(self, out: RequestOutput) -> None:
        """Fold `out`, the same request's next output, into this one (the offline API's accumulated result)."""
        self.new_text += out.new_text
        self.new_token_ids += out.new_token_ids
        self.completion_tokens, self.cached_tokens = out.completion_tokens, out.cached_tokens
        if out.logprobs:
            self.logprobs = (self.logprobs or []) + out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finished, self.finish_reason, self.timing = True, out.finish_reason, out.timing
            self.error, self.error_kind = out.error, out.error_kind
