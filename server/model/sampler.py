"""Per-request sampling: greedy, temperature, top-k, top-p, seeds that do not depend on the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hotlora.server.engine.types import SamplingParams, TokenLogprob


@dataclass(slots=True)
class SampleRequest:
    params: SamplingParams
    generator: torch.Generator  # a seeded request's own stream: the same draws whatever the batch holds


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


def _sample_row(logits: torch.Tensor, req: SampleRequest) -> int:
    p = req.params
    if p.greedy:
        return int(torch.argmax(logits))
    probs = _filter(logits / p.temperature, p.top_k, p.top_p).softmax(-1)
    # exponential race: argmax(p_i / E_i), E_i ~ Exp(1), draws token i with probability p_i
    noise = torch.empty_like(probs).exponential_(generator=req.generator)
    return int(torch.argmax(probs / noise))


def sample(logits: torch.Tensor, requests: list[SampleRequest]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [S, V] float32, one row per request -> chosen token ids, and logprobs where asked."""
    tokens: list[int] = []
    logprobs: list[TokenLogprob | None] = []
    greedy = torch.argmax(logits, dim=-1).tolist()
    for i, req in enumerate(requests):
        if req.params.greedy and req.params.logprobs is None:
            tokens.append(greedy[i])
            logprobs.append(None)
            continue
        row = logits[i].cpu()  # generators live on the CPU
        tok = greedy[i] if req.params.greedy else _sample_row(row, req)
        tokens.append(tok)
        logprobs.append(_logprob(row, tok, req.params.logprobs))
    return tokens, logprobs


def _logprob(logits: torch.Tensor, token: int, top: int | None) -> TokenLogprob | None:
    if top is None:
        return None
    lp = torch.log_softmax(logits, dim=-1)
    alts: list[tuple[int, float]] = []
    if top > 0:
        values, ids = torch.topk(lp, top)
        alts = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id=token, logprob=float(lp[token]), top=alts)
