"""Logits processors, batched on the device: penalties, logit_bias, the min_tokens stop mask, min-p.

One step's processors are built once from the sampled rows' parameters (host lists -> a few tensors),
then applied to the whole [rows, vocab] logits with tensor ops: no per-request loop and no host
synchronisation on the device side. Rows that use no processor pass through unchanged (their
parameters are the neutral values: penalty 1 or 0, no bias, no mask, min_p 0).

Order, as vLLM's: the min_tokens stop mask and logit_bias, then the repetition, frequency and presence
penalties; temperature and min-p come after (see `min_p_filter`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from hotlora.server.engine.types import SamplingParams


@dataclass(slots=True)
class RowTokens:
    """What a sampled row has seen: its prompt and its generated token ids."""

    params: SamplingParams
    prompt_ids: Seq[int]
    output_ids: Seq[int]


@dataclass(slots=True)
class LogitsProcessors:
    """One step's processors. Any field may be None: that processor is off for every row."""

    repetition: torch.Tensor | None = None  # [R, 1] float32 penalty (1 = off)
    frequency: torch.Tensor | None = None  # [R, 1] float32
    presence: torch.Tensor | None = None  # [R, 1] float32
    seen: torch.Tensor | None = None  # [R, V] bool: the token is in the row's prompt or output
    output_counts: torch.Tensor | None = None  # [R, V] float32: occurrences in the row's output
    bias_index: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids), int64 [N]
    bias_values: torch.Tensor | None = None  # [N] float32
    stop_mask_index: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids) to set to -inf

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [R, V] float32 -> processed logits (a new tensor; the input is left as it is)."""
        if self.stop_mask_index is not None:
            masked = logits.index_put(self.stop_mask_index, torch.full((), float("-inf"), device=logits.device))
            # a row that the mask would leave with no token (its grammar can only end now) keeps its stop
            # tokens: the grammar wins over min_tokens, as it must for the output to stay valid
            logits = torch.where(torch.isfinite(masked).any(-1, keepdim=True), masked, logits)
        else:
            logits = logits.clone()
        if self.bias_index is not None:
            logits.index_put_(self.bias_index, self.bias_values, accumulate=True)
        if self.repetition is not None:
            # vLLM / CTRL: a seen token's positive logit is divided by the penalty, a negative one multiplied
            scaled = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(self.seen, scaled, logits)
        if self.frequency is not None:
            # OpenAI: mu[j] -= c[j] * alpha_frequency + (c[j] > 0) * alpha_presence, over generated tokens
            counts = self.output_counts
            logits = logits - counts * self.frequency - (counts > 0).float() * self.presence
        return logits


def _ids_matrix(rows: list[Seq[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] float32 occurrence counts: the rows' ids padded with V into one tensor, one scatter_add.
    A row is a list or an int64 tensor (the runner passes views of each sequence's id tensor: a copy per row,
    no Python object per token)."""
    width = max((len(r) for r in rows), default=0)
    padded = torch.full((len(rows), width + 1), vocab, dtype=torch.int64)
    for i, r in enumerate(rows):  # batch metadata, on the host; the counting itself is one device op
        if len(r):
            padded[i, : len(r)] = torch.as_tensor(r, dtype=torch.int64)
    padded = padded.to(device, non_blocking=True)
    counts = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab]


def _joined(row: RowTokens) -> Seq[int]:
    """The row's prompt and output ids, one after the other."""
    if isinstance(row.prompt_ids, torch.Tensor) and isinstance(row.output_ids, torch.Tensor):
        return torch.cat([row.prompt_ids, row.output_ids])
    return [*row.prompt_ids, *row.output_ids]


_BIAS_ROWS: OrderedDict[int, tuple[dict[int, float], torch.Tensor, torch.Tensor]] = OrderedDict()
_BIAS_ROWS_KEPT = 4096


def _bias_row(bias: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's logit_bias as (token ids int64, values float32) host tensors, built once per request and
    not every step (300 entries x 32 rows took 4.3 ms a step). Keyed by the dict's id; the entry holds the
    dict itself, so that id cannot be reused while it is cached (least recently used dropped first)."""
    hit = _BIAS_ROWS.get(id(bias))
    if hit is not None and hit[0] is bias:
        _BIAS_ROWS.move_to_end(id(bias))
        return hit[1], hit[2]
    row = (bias, torch.tensor(list(bias), dtype=torch.int64), torch.tensor(list(bias.values()), dtype=torch.float32))
    _BIAS_ROWS[id(bias)] = row
    if len(_BIAS_ROWS) > _BIAS_ROWS_KEPT:
        _BIAS_ROWS.popitem(last=False)
    return row[1], row[2]


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True).unsqueeze(1)


def _pairs(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2).to(device, non_blocking=True)
    return t[:, 0], t[:, 1]


def build_processors(rows: list[RowTokens], vocab: int, eos_ids: set[int], device: torch.device
                     ) -> LogitsProcessors | None:
    """The step's processors, or None when no row uses any (the common case costs nothing)."""
    procs = LogitsProcessors()
    params = [r.params for r in rows]
    if any(p.repetition_penalty != 1.0 for p in params):
        procs.repetition = _column([p.repetition_penalty for p in params], device)
        procs.seen = _ids_matrix([_joined(r) for r in rows], vocab, device) > 0
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        procs.frequency = _column([p.frequency_penalty for p in params], device)
        procs.presence = _column([p.presence_penalty for p in params], device)
        procs.output_counts = _ids_matrix([r.output_ids for r in rows], vocab, device)
    biased = [(i, _bias_row(p.logit_bias)) for i, p in enumerate(params) if p.logit_bias]
    if biased:
        counts = torch.tensor([len(ids) for _, (ids, _) in biased])
        rows_of = torch.repeat_interleave(torch.tensor([i for i, _ in biased]), counts)
        ids = torch.cat([ids for _, (ids, _) in biased])
        procs.bias_index = (rows_of.to(device, non_blocking=True), ids.to(device, non_blocking=True))
        procs.bias_values = torch.cat([v for _, (_, v) in biased]).to(device, non_blocking=True)
    masked = [(i, t) for i, r in enumerate(rows) if len(r.output_ids) < r.params.min_tokens
              for t in sorted(eos_ids | set(r.params.stop_token_ids)) if 0 <= t < vocab]
    if masked:
        procs.stop_mask_index = _pairs(masked, device)
    if all(f is None for f in (procs.repetition, procs.frequency, procs.bias_index, procs.stop_mask_index)):
        return None
    return procs


def temperature_min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Divide each row by its temperature (greedy rows by 1), then drop, in rows with min_p > 0, every
    token whose probability is below min_p times the row's top probability (as HF's MinPLogitsWarper)."""
    device = logits.device
    temps = _column([1.0 if p.greedy else p.temperature for p in params], device)
    logits = logits / temps
    if not any(p.min_p > 0 for p in params):
        return logits
    min_p = _column([p.min_p for p in params], device)
    probs = logits.softmax(-1)
    threshold = probs.amax(-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))
