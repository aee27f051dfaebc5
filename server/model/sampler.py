"""Per-request sampling, batched on the model's device: logits processors, greedy, temperature, min-p, top-k,
top-p, and seeds that do not depend on the batch.

A step's sampling is a fixed number of batched tensor ops whatever the batch holds, and one device -> host
copy at the end (the chosen tokens and the asked logprobs, packed into one tensor): no Python loop over
vocab-sized rows, no per-request synchronisation.

Randomness is counter-based: a drawn row uses one uniform u in [0, 1), a hash of (the request's seed, the
index of the token being generated) computed on the host, and takes the token whose interval of the
cumulative distribution holds u (inverse-CDF sampling). So a seeded request draws the same whatever shares
the batch and however the steps fall (chunked prefill, preemption and recompute); there is
no random-generator state to keep. An unseeded request gets a random seed once, when it starts.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from hotlora.server.engine.types import SamplingParams, TokenLogprob
from hotlora.server.model.grammar import apply_grammars
from hotlora.server.model.logits import RowTokens, build_processors, temperature_min_p

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (2**64 / golden ratio)
_BLOCK = 256  # tokens per block of the two-level inverse CDF


@dataclass(slots=True)
class SampleRequest:
    params: SamplingParams
    seed: int = 0  # the request's seed (an unseeded request's was drawn once, when it started)
    index: int = 0  # which generated token this row draws (0 = the first): with seed, it fixes the row's uniform
    prompt_ids: Seq[int] = ()  # for the repetition penalty
    output_ids: Seq[int] = ()  # for the penalties and min_tokens
    grammar: Any = None  # the sequence's xgrammar matcher (structured outputs), None = unconstrained


def _mix64(z: int) -> int:
    """splitmix64's output function: a bijection of 64-bit ints whose outputs pass BigCrush."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def draw_uniform(seed: int, index: int) -> float:
    """The index-th uniform in [0, 1) of seed's stream: splitmix64's index-th output for a key hashed from
    the seed (so seeds n and n + 1, as n choices get, start unrelated streams), with 53 random bits."""
    key = _mix64((seed & _MASK64) ^ 0x6A09E667F3BCC909)
    return (_mix64((key + (index + 1) * _GAMMA) & _MASK64) >> 11) * 2.0**-53


def process(logits: torch.Tensor, requests: list[SampleRequest], eos_ids: set[int]) -> torch.Tensor:
    """The logits after every request's processors (allowed_token_ids, bad words, min_tokens mask, bias, penalties),
    one batched pass."""
    rows = [RowTokens(r.params, r.prompt_ids, r.output_ids) for r in requests]
    procs = build_processors(rows, logits.shape[-1], eos_ids, logits.device)
    return logits if procs is None else procs.apply(logits)


def _device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor, copied without waiting for the device."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _select(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t's rows listed (no copy when they are all of them, in order)."""
    if rows == list(range(t.shape[0])):
        return t
    return t.index_select(0, _device(rows, torch.int64, t.device))


def _top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """logits [R, V] with every token below its row's k-th largest logit at -inf (ties with the k-th stay, as
    in HF's TopKLogitsWarper); rows with k = 0 unchanged. One batched topk of the largest k."""
    vocab = logits.shape[-1]
    ks = [min(k, vocab) for k in ks]
    top = torch.topk(logits, max(ks), dim=-1).values  # [R, kmax], descending
    k = _device(ks, torch.int64, logits.device)[:, None]
    kth = top.gather(1, (k - 1).clamp(min=0))
    kth = torch.where(k > 0, kth, float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def _search(weights: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weights [R, N] >= 0, x [R, 1] float64 in [0, 1) -> [R, 1] each: the index i whose interval
    [cdf[i-1], cdf[i]) of the normalized float64 cdf holds x, and where x lies in it (x - cdf[i-1] and
    cdf[i] - cdf[i-1]). A zero weight has an empty interval: it is never chosen."""
    cdf = weights.cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1:]
    x = torch.minimum(x * total, torch.nextafter(total, torch.zeros_like(total)))  # rounding could reach total
    i = torch.searchsorted(cdf, x, right=True).clamp(max=weights.shape[-1] - 1)
    before = torch.where(i > 0, cdf.gather(1, (i - 1).clamp(min=0)), 0.0)
    return i, x - before, cdf.gather(1, i) - before


def _invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [R, V] float32 (any non-negative weights), u [R] float64 in [0, 1) -> [R] int64: the token whose
    interval of the cumulative distribution holds u. In two levels, so that float64 sums run only over
    [R, V / _BLOCK] block sums and one block per row (a float64 cumsum of whole rows was most of the CPU
    cost); a float32 cdf of whole rows would not do: near 1 it rounds the weights of a 128K vocab's tail
    (~1e-8) to 0 or to one ulp (6e-8)."""
    rows, vocab = probs.shape
    probs = probs.contiguous()
    full = vocab // _BLOCK
    sums = probs.as_strided((rows, full, _BLOCK), (vocab, _BLOCK, 1)).sum(-1)  # pairwise float32: ~1e-7 relative
    if vocab % _BLOCK:
        sums = torch.cat([sums, probs[:, full * _BLOCK :].sum(-1, keepdim=True)], dim=1)
    block, into, width = _search(sums, u[:, None])
    cols = block * _BLOCK + torch.arange(_BLOCK, device=probs.device)  # [R, _BLOCK]; a last partial block
    inside = probs.gather(1, cols.clamp(max=vocab - 1)).masked_fill(cols >= vocab, 0.0)  # ... weighs 0 beyond V
    # where u falls inside its block, as a fraction: each token gets its exact share of the block's mass (the
    # block's float32 sum may differ from its tokens' float64 sum by more than a tail token weighs)
    offset, _, _ = _search(inside, into / width)
    return (block * _BLOCK + offset).squeeze(1)


def _top_p_draw(logits: torch.Tensor, top_p: list[float], u: torch.Tensor) -> torch.Tensor:
    """Draw from logits [R, V] restricted to each row's top-p nucleus: in descending order, a token is dropped
    once the probability mass before it reaches top_p (the first token always stays). One batched sort."""
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    probs = ordered.softmax(-1)
    p = _device(top_p, torch.float32, logits.device)[:, None]
    dropped = probs.cumsum(-1) - probs >= p
    dropped[:, 0] = False  # a top_p below float32's range (1e-46) is 0: it would drop the first token too
    probs = probs.masked_fill(dropped, 0.0)
    return order.gather(1, _invert_cdf(probs, u)[:, None]).squeeze(1)


def _draw(logits: torch.Tensor, requests: list[SampleRequest]) -> torch.Tensor:
    """logits [R, V] float32 of rows that all draw -> [R] int64 tokens: temperature, min-p, top-k, top-p."""
    params = [r.params for r in requests]
    dev = logits.device
    scaled = temperature_min_p(logits, params)
    if any(0 < p.top_k < logits.shape[-1] for p in params):
        scaled = _top_k(scaled, [p.top_k for p in params])
    u = _device([draw_uniform(r.seed, r.index) for r in requests], torch.float64, dev)
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if not nucleus:
        return _invert_cdf(scaled.softmax(-1), u)
    if len(nucleus) == len(params):
        return _top_p_draw(scaled, [p.top_p for p in params], u)
    # the sort is the costly part: only the rows with top_p pay it
    tokens = _invert_cdf(scaled.softmax(-1), u)
    drawn = _top_p_draw(_select(scaled, nucleus), [params[i].top_p for i in nucleus], _select(u, nucleus))
    return tokens.index_copy(0, _device(nucleus, torch.int64, dev), drawn)


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, rows: list[int], top: int) -> torch.Tensor:
    """[A, 1 + 2 * top] float64 for the asked rows: the chosen token's logprob, then the top alternatives'
    ids and logprobs (the model's own distribution, before processors and temperature; over the tokens a grammar
    allows, with the rest at -9999)."""
    lp = torch.log_softmax(_select(raw, rows).float(), dim=-1)
    # non-finite logits (an adapter whose weights overflow) give NaN, which JSON cannot carry: -9999 as vLLM's floor
    lp = torch.nan_to_num(lp, nan=-9999.0, posinf=-9999.0, neginf=-9999.0)
    parts = [lp.gather(1, _select(tokens, rows)[:, None])]
    if top > 0:
        values, ids = torch.topk(lp, top, dim=-1)
        parts += [ids.double(), values]
    return torch.cat([t.double() for t in parts], dim=1)


def _to_host(t: torch.Tensor, ready: torch.cuda.Event | None = None) -> list:
    """The step's one wait for the device: for `ready` (the event behind its device -> host copy), then the
    host values."""
    if ready is not None:
        ready.synchronize()
    return t.tolist()


def sample(logits: torch.Tensor, requests: list[SampleRequest], eos_ids: set[int] | None = None
           ) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [S, V] float32, one row per request -> chosen token ids, and logprobs where asked.

    Logprobs are those of the model's own distribution (before processors and temperature), as vLLM's
    default."""
    return launch_sample(logits, requests, eos_ids).finish()


@dataclass(slots=True)
class PendingSample:
    """A step's sampling issued on the device: wait() is the step's one host sync, finish() unpacks it.

    On CUDA the result's copy to (pinned) host memory is queued right behind the sampling, with an event, so
    wait() waits for this step only, not for a later step queued behind it (asynchronous scheduling)."""

    packed: torch.Tensor  # [S] token ids, or float64 [S + A * (1 + 2 * top)] with the asked rows' logprobs
    requests: list[SampleRequest]
    asked: list[int]  # rows that want logprobs
    top: int  # alternatives per asked row in packed
    tokens: torch.Tensor | None = None  # int64 [S] the chosen ids on the device: a next step's inputs
    host: list | None = None
    staged: torch.Tensor | None = None  # packed's host copy (CUDA: in flight until `ready`)
    ready: torch.cuda.Event | None = None

    def __post_init__(self) -> None:
        if not self.packed.is_cuda:
            self.staged = self.packed
            return
        self.staged = torch.empty(self.packed.shape, dtype=self.packed.dtype, pin_memory=True)
        self.staged.copy_(self.packed, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record()

    def wait(self) -> None:
        """Bring the result to the host: on CUDA this waits for the step's forward and sampling."""
        if self.host is None:
            self.host = _to_host(self.staged, self.ready)

    def finish(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """The chosen token ids, and logprobs where asked."""
        self.wait()
        n = len(self.requests)
        chosen = [int(t) for t in self.host[:n]]
        if not self.asked:
            return chosen, [None] * n
        return chosen, _unpack(self.host[n:], chosen, self.requests, self.asked, self.top)


def launch_sample(logits: torch.Tensor, requests: list[SampleRequest], eos_ids: set[int] | None = None
                  ) -> PendingSample:
    """logits [S, V] float32, one row per request: grammars, processors, the greedy and drawn tokens and the
    asked logprobs, all issued on the logits' device with no host sync (on CUDA they queue behind the step's
    forward)."""
    logits = apply_grammars(logits, [r.grammar for r in requests])
    allowed = logits  # logprobs are the model's own over what a grammar allows (vLLM masks before it samples too)
    logits = process(logits, requests, eos_ids or set())
    drawn = [i for i, r in enumerate(requests) if not r.params.greedy]
    if len(drawn) == len(requests):
        tokens = _draw(logits.float(), requests)
    else:
        tokens = torch.argmax(logits, dim=-1)  # greedy rows keep this
        if drawn:
            picked = _draw(_select(logits, drawn).float(), [requests[i] for i in drawn])
            tokens = tokens.index_copy(0, _device(drawn, torch.int64, logits.device), picked)
    asked = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not asked:
        return PendingSample(tokens, requests, [], 0, tokens)
    top = max(requests[i].params.logprobs for i in asked)
    block = _logprobs(allowed, tokens, asked, top)
    # ids < 2**53 are exact in float64
    return PendingSample(torch.cat([tokens.double(), block.flatten()]), requests, asked, top, tokens)


def _unpack(flat: list[float], tokens: list[int], requests: list[SampleRequest], asked: list[int], top: int
            ) -> list[TokenLogprob | None]:
    """The asked rows' TokenLogprob from _logprobs' block, flattened: each row keeps its own number of
    alternatives."""
    out: list[TokenLogprob | None] = [None] * len(tokens)
    width = 1 + 2 * top
    for j, i in enumerate(asked):
        row = flat[j * width : (j + 1) * width]
        k = requests[i].params.logprobs
        alts = [(int(t), v) for t, v in zip(row[1 : 1 + k], row[1 + top : 1 + top + k], strict=True)]
        out[i] = TokenLogprob(token_id=tokens[i], logprob=row[0], top=alts)
    return out
