"""Per-request sampling: logits processors, greedy, temperature, min-p, top-k, top-p, and seeds that do not
depend on the batch."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from hotlora.server.engine.types import SamplingParams, TokenLogprob
from hotlora.server.model.grammar import apply_grammars
from hotlora.server.model.logits import RowTokens, build_processors, temperature_min_p


@dataclass(slots=True)
class SampleRequest:
    params: SamplingParams
    generator: torch.Generator  # a seeded request's own stream: the same draws whatever the batch holds
    prompt_ids: Seq[int] = ()  # for the repetition penalty
    output_ids: Seq[int] = ()  # for the penalties and min_tokens
    grammar: Any = None  # the sequence's xgrammar matcher (structured outputs), None = unconstrained


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] with everything outside the top-k / top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def _sample_row(scaled: torch.Tensor, req: SampleRequest) -> int:
    """scaled [V]: the row's processed logits, already divided by its temperature and min-p filtered."""
    p = req.params
    probs = _filter(scaled, p.top_k, p.top_p).softmax(-1)
    # exponential race: argmax(p_i / E_i), E_i ~ Exp(1), draws token i with probability p_i
    noise = torch.empty_like(probs).exponential_(generator=req.generator)
    return int(torch.argmax(probs / noise))


def process(logits: torch.Tensor, requests: list[SampleRequest], eos_ids: set[int]) -> torch.Tensor:
    """The logits after every request's processors (penalties, bias, min_tokens mask), one batched pass."""
    rows = [RowTokens(r.params, r.prompt_ids, r.output_ids) for r in requests]
    procs = build_processors(rows, logits.shape[-1], eos_ids, logits.device)
    return logits if procs is None else procs.apply(logits)


@dataclass(slots=True)
class PendingSample:
    """A step's sampling issued on the device: wait() is the step's one host sync, finish() the host rest."""

    raw: torch.Tensor  # [S, V] the model's logits (for logprobs)
    logits: torch.Tensor  # [S, V] after grammars and processors
    requests: list[SampleRequest]
    argmax: torch.Tensor  # [S] int64, on the logits' device
    greedy: list[int] | None = None

    def wait(self) -> None:
        """Bring the greedy ids to the host: on CUDA this waits for the step's forward and processors."""
        self.greedy = self.argmax.tolist()

    def finish(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """The chosen token ids (seeded draws for the sampled rows), and logprobs where asked."""
        if self.greedy is None:
            self.wait()
        requests, tokens = self.requests, list(self.greedy)
        drawn = [i for i, r in enumerate(requests) if not r.params.greedy]
        if drawn:  # the generators live on the CPU
            scaled = temperature_min_p(self.logits[drawn], [requests[i].params for i in drawn]).cpu()
            for row, i in enumerate(drawn):
                tokens[i] = _sample_row(scaled[row], requests[i])
        asked = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        if asked:
            lp = torch.log_softmax(self.raw[asked].float(), dim=-1).cpu()
            for row, i in enumerate(asked):
                logprobs[i] = _logprob(lp[row], tokens[i], requests[i].params.logprobs)
        return tokens, logprobs


def launch_sample(logits: torch.Tensor, requests: list[SampleRequest], eos_ids: set[int] | None = None
                  ) -> PendingSample:
    """logits [S, V] float32, one row per request: grammars and processors applied and the argmax issued,
    with no host sync (on CUDA everything queues behind the step's forward)."""
    processed = process(apply_grammars(logits, [r.grammar for r in requests]), requests, eos_ids or set())
    return PendingSample(logits, processed, requests, torch.argmax(processed, dim=-1))


def sample(logits: torch.Tensor, requests: list[SampleRequest], eos_ids: set[int] | None = None
           ) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [S, V] float32, one row per request -> chosen token ids, and logprobs where asked.

    Logprobs are those of the model's own distribution (before processors and temperature), as vLLM's
    default."""
    return launch_sample(logits, requests, eos_ids).finish()


def _logprob(lp: torch.Tensor, token: int, top: int | None) -> TokenLogprob | None:
    if top is None:
        return None
    alts: list[tuple[int, float]] = []
    if top > 0:
        values, ids = torch.topk(lp, top)
        alts = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id=token, logprob=float(lp[token]), top=alts)
