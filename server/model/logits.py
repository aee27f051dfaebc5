"""Logits processors, batched on the device: allowed_token_ids, bad words, the min_tokens stop mask, logit_bias,
penalties, min-p.

One step's processors are built once from the sampled rows' parameters (host lists -> a few tensors),
then applied to the whole [rows, vocab] logits with tensor ops: no per-request loop and no host
synchronisation on the device side. Rows that use no processor pass through unchanged (their
parameters are the neutral values: penalty 1 or 0, no bias, no mask, min_p 0).

Order, as vLLM's: allowed_token_ids and bad words first (after a grammar's bitmask, which the sampler applies
before these), then the min_tokens stop mask and logit_bias, then the repetition, frequency and presence
penalties; temperature and min-p come after (see `temperature_min_p`). A token masked to -inf stays there: a bias
or penalty cannot bring it back. The min_tokens mask never empties a row: where the grammar or
allowed_token_ids leave only stop tokens, the request may stop (as a grammar that can only end does).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from hotlora.server.engine.memo import PerObject
from hotlora.server.engine.token_rules import bad_words_index
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
    allowed_index: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids) that stay
    unrestricted: torch.Tensor | None = None  # [R, 1] bool: the row has no allowed_token_ids (with allowed_index)
    ban_index: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids) of bad words: to -inf

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [R, V] float32 -> processed logits (a new tensor; the input, maybe a CUDA graph's static
        output, is left as it is)."""
        masked = self._masked(logits)
        logits = logits.clone() if masked is logits else masked
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

    def _masked(self, logits: torch.Tensor) -> torch.Tensor:
        """Tokens that may not be sampled at -inf: outside allowed_token_ids, completing a bad word, and stop
        tokens before min_tokens (a new tensor, or `logits` itself when no mask is on)."""
        neg_inf = torch.full((), float("-inf"), device=logits.device)
        if self.allowed_index is not None:
            keep = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            keep.index_put_(self.allowed_index, torch.ones((), dtype=torch.bool, device=logits.device))
            logits = logits.masked_fill(~(keep | self.unrestricted), float("-inf"))
        if self.ban_index is not None:
            logits = logits.index_put(self.ban_index, neg_inf)
        if self.stop_mask_index is not None:
            masked = logits.index_put(self.stop_mask_index, neg_inf)
            # a row that the mask would leave with no token (its grammar or allowed_token_ids can only end now)
            # keeps its stop tokens: they win over min_tokens, as they must for the output to stay valid
            logits = torch.where(torch.isfinite(masked).any(-1, keepdim=True), masked, logits)
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


def _ids(ids: Seq[int]) -> torch.Tensor:
    return torch.tensor(list(ids), dtype=torch.int64)


class OnDevice:
    """A request's host tensor (token ids, bias values), copied to a device once, not every step: 256 rows of 4,096
    allowed ids were 8 MiB of host-to-device copy a step."""

    __slots__ = ("_on", "host")

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host
        self._on: dict[torch.device, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.host)

    def on(self, device: torch.device) -> torch.Tensor:
        t = self._on.get(device)
        if t is None:
            # asynchronous: a blocking copy from pageable memory would wait for the step in flight
            t = self._on[device] = self.host.to(device, non_blocking=True)
        return t


def _device_ids(ids: Seq[int]) -> OnDevice:
    return OnDevice(_ids(ids))


def _device_bias(bias: dict[int, float]) -> tuple[OnDevice, OnDevice]:
    return _device_ids(bias), OnDevice(torch.tensor(list(bias.values()), dtype=torch.float32))


# up to 4,096 ids each (32 KiB on the host and on the device); four times the rows of a step on CUDA by default
# (max_num_seqs 256), so that running requests do not evict each other
_bias_row = PerObject(_device_bias, kept=1024)  # a request's logit_bias: (ids, values), up to 300 entries
_allowed_row = PerObject(_device_ids, kept=1024)  # a request's allowed_token_ids
_single_row = PerObject(lambda words: _device_ids(sorted(bad_words_index(words).single)), kept=1024)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True).unsqueeze(1)


def _pairs(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2).to(device, non_blocking=True)
    return t[:, 0], t[:, 1]


def _row_index(per_row: list[tuple[int, torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, ids) pairs, the ids all on the host or all on `device` -> (rows, token ids) int64 index tensors on the
    device: the ids concatenated, each row's index repeated for its ids (on the device, without a host sync)."""
    counts = [len(ids) for _, ids in per_row]
    rows = torch.tensor([i for i, _ in per_row]).to(device, non_blocking=True)
    repeats = torch.tensor(counts).to(device, non_blocking=True)
    rows = torch.repeat_interleave(rows, repeats, output_size=sum(counts))
    return rows, torch.cat([ids for _, ids in per_row]).to(device, non_blocking=True)


def _set_penalties(procs: LogitsProcessors, rows: list[RowTokens], params: list[SamplingParams], vocab: int,
                   device: torch.device) -> None:
    if any(p.repetition_penalty != 1.0 for p in params):
        procs.repetition = _column([p.repetition_penalty for p in params], device)
        procs.seen = _ids_matrix([_joined(r) for r in rows], vocab, device) > 0
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        procs.frequency = _column([p.frequency_penalty for p in params], device)
        procs.presence = _column([p.presence_penalty for p in params], device)
        procs.output_counts = _ids_matrix([r.output_ids for r in rows], vocab, device)


def _set_bias(procs: LogitsProcessors, params: list[SamplingParams], device: torch.device) -> None:
    biased = [(i, _bias_row(p.logit_bias)) for i, p in enumerate(params) if p.logit_bias]
    if biased:
        procs.bias_index = _row_index([(i, ids.on(device)) for i, (ids, _) in biased], device)
        procs.bias_values = torch.cat([values.on(device) for _, (_, values) in biased])


def _set_allowed(procs: LogitsProcessors, params: list[SamplingParams], device: torch.device) -> None:
    restricted = [(i, _allowed_row(p.allowed_token_ids).on(device)) for i, p in enumerate(params)
                  if p.allowed_token_ids is not None]
    if restricted:
        procs.allowed_index = _row_index(restricted, device)
        free = [p.allowed_token_ids is None for p in params]
        procs.unrestricted = torch.tensor(free).to(device, non_blocking=True).unsqueeze(1)


def _set_bad_words(procs: LogitsProcessors, rows: list[RowTokens], device: torch.device) -> None:
    """One-token words at every step; a longer word's last token where the row's output ends with its others
    (host work: one dict lookup per row with such words, and a short comparison on a hit)."""
    banned = []
    for i, r in enumerate(rows):
        words = r.params.bad_words_ids
        if words:
            single = _single_row(words)
            now = bad_words_index(words).banned_after(r.output_ids)
            if now:
                banned.append((i, torch.cat([single.on(device), _ids(now).to(device, non_blocking=True)])))
            elif len(single):
                banned.append((i, single.on(device)))
    if banned:
        procs.ban_index = _row_index(banned, device)


def _set_stop_mask(procs: LogitsProcessors, rows: list[RowTokens], vocab: int, eos_ids: set[int],
                   device: torch.device) -> None:
    masked = [(i, t) for i, r in enumerate(rows) if len(r.output_ids) < r.params.min_tokens
              for t in sorted(eos_ids | set(r.params.stop_token_ids)) if 0 <= t < vocab]
    if masked:
        procs.stop_mask_index = _pairs(masked, device)


def build_processors(rows: list[RowTokens], vocab: int, eos_ids: set[int], device: torch.device
                     ) -> LogitsProcessors | None:
    """The step's processors, or None when no row uses any (the common case costs nothing)."""
    procs = LogitsProcessors()
    params = [r.params for r in rows]
    _set_penalties(procs, rows, params, vocab, device)
    _set_bias(procs, params, device)
    # when no row has them: one pass, ~16 ns a row (a filtering list comprehension is the fastest of any()'s forms)
    if [p for p in params if p.allowed_token_ids is not None or p.bad_words_ids]:
        _set_allowed(procs, params, device)
        _set_bad_words(procs, rows, device)
    _set_stop_mask(procs, rows, vocab, eos_ids, device)
    used = (procs.repetition, procs.frequency, procs.bias_index, procs.stop_mask_index, procs.allowed_index,
            procs.ban_index)
    return None if all(f is None for f in used) else procs


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
