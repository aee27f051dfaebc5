"""One request's state inside the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from hotlora.server.engine.types import FinishReason, RequestTiming, SamplingParams, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    """Token ids = prompt + generated. `num_computed` of them are in the KV cache.

    After a preemption the KV cache is dropped (num_computed = 0) and every token, generated ones
    included, is prefilled again: recompute, not swap.
    """

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    adapter: Any = None  # the registry's version handle (None = base model); opaque to the engine
    arrival: int = 0  # admission order: earlier first, and the latest is preempted first
    status: SequenceStatus = SequenceStatus.WAITING
    num_prompt: int = field(init=False)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    lora_slot: int = -1  # device slot while running with an adapter
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # with params.prompt_logprobs: the logprobs of prompt tokens 1, 2, ... (the runner fills them during the
    # prefill; a recompute after preemption does not score them again)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    detok: Any = None  # the incremental detokenizer's state
    # the sampler's seed: params.seed, or one drawn for an unseeded request when it starts; with the index of
    # the token being generated it fixes that token's draw (the same after a preemption and recompute)
    sampling_seed: int | None = None
    # structured outputs: the grammar matcher, advanced with every appended token; a preemption keeps it
    # (recompute prefills the generated tokens again but never re-samples them)
    grammar: Any = None
    rules: Any = None  # token_rules.TokenRules: what its allowed_token_ids and bad words forbid (None: nothing)
    # prefix caching (block_manager): chain keys of the full token blocks, how many leading blocks of
    # block_table are registered or were mapped from the cache, and what the first admission found
    cache_ns: int | None = None  # the namespace: the adapter version's registry id (None = base model)
    block_hashes: list[bytes] = field(default_factory=list)
    num_committed_blocks: int = 0
    prefix_queried: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (usage.cached_tokens)
    # the request's phases on time.monotonic() (types.RequestTiming; 0.0 = not yet): a few writes per request
    queued_ts: float = 0.0  # handed to the engine
    scheduled_ts: float = 0.0  # first admitted into a step (kept across preemptions, as vLLM does)
    first_token_ts: float = 0.0  # the first output token on the host
    finished_ts: float = 0.0  # finished, failed or aborted

    def __post_init__(self) -> None:
        self.num_prompt = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def scoring_prompt(self) -> bool:
        """Prompt logprobs are asked for and some prompt tokens are still unscored."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt - 1

    def prompt_logprobs_output(self, generated: int) -> list[TokenLogprob | None] | None:
        """The prompt's logprobs for the output of generated token number `generated`: on the first one only
        (None first: nothing predicts the first prompt token)."""
        if self.params.prompt_logprobs is None or generated != 1:
            return None
        return [None, *self.prompt_logprobs]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def timing(self) -> RequestTiming:
        return RequestTiming(self.queued_ts, self.scheduled_ts, self.first_token_ts, self.finished_ts)
