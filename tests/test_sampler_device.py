"""The batched device sampler: its draws follow softmax(logits / T) after min-p, top-k and top-p (against
transformers' warpers as the reference), a seeded row draws the same whatever shares its batch, a step
copies to the host once and never waits on the device otherwise, and logprobs are the raw logits'
log-softmax."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from hotlora.server.engine.types import SamplingParams
from hotlora.server.model import sampler
from hotlora.server.model.sampler import SampleRequest, _invert_cdf, draw_uniform, sample

# no top-p boundary falls near a cumulative mass, so float rounding cannot move a token in or out
LOGITS = torch.tensor([2.0, 1.6, 1.1, 0.9, 0.2, -0.4, -1.0, -2.5])
CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.0, min_p=0.15),
    dict(temperature=1.4, top_k=6, top_p=0.9, min_p=0.05),
]
EOS = {2}


def _reference(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """[V] probabilities by transformers' warpers, in the sampler's order: temperature, min-p, top-k, top-p."""
    scores = TemperatureLogitsWarper(p.temperature)(None, logits[None].clone())
    if p.min_p > 0:
        scores = MinPLogitsWarper(p.min_p)(None, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    return scores[0].softmax(-1).double()


def _chi_square_bound(df: int, z: float = 4.5) -> float:
    """The chi-square quantile at normal deviate z (Wilson-Hilferty): exceeded with probability ~3e-6."""
    c = 2.0 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


def _assert_follows(tokens: list[int], probs: torch.Tensor) -> None:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0, "a token outside the kept set was drawn"
    expected = len(tokens) * probs[kept]
    stat = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert stat < _chi_square_bound(int(kept.sum()) - 1), (stat, counts.tolist(), expected.tolist())


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_draws_over_many_seeds_follow_the_filtered_softmax(case):
    params = SamplingParams(**case)
    n = 20000
    tokens, _ = sample(LOGITS.expand(n, -1), [SampleRequest(params, seed) for seed in range(n)])
    _assert_follows(tokens, _reference(LOGITS, params))


def test_a_mixed_batch_draws_each_row_from_its_own_distribution():
    """Rows of every case, interleaved with greedy rows: each case's rows (one seed's stream, successive
    token indices) follow that case's distribution; greedy rows take the argmax."""
    cases = [SamplingParams(**c) for c in CASES] + [SamplingParams(temperature=0.0)]
    n = 6000 * len(cases)
    shift = torch.arange(n)[:, None] % 3 * 0.0  # the same logits in every row, materialized
    reqs = [SampleRequest(cases[i % len(cases)], 7, i) for i in range(n)]
    tokens, _ = sample(LOGITS + shift, reqs)
    for c, params in enumerate(cases[:-1]):
        _assert_follows(tokens[c :: len(cases)], _reference(LOGITS, params))
    assert set(tokens[len(cases) - 1 :: len(cases)]) == {int(LOGITS.argmax())}


@pytest.mark.parametrize("case", [dict(temperature=1e-38), dict(temperature=1e-37), dict(temperature=1e-6),
                                  dict(top_p=1e-46), dict(top_p=1e-30), dict(temperature=1e-38, top_p=1e-46)],
                         ids=str)
def test_tiny_temperature_and_top_p_are_their_limit_greedy(case):
    """Valid values past float32's range (40 / 1e-37 is inf, a top_p of 1e-46 is 0) take the argmax, as their
    limit does, and never the vocabulary's last token (the draw from a NaN row)."""
    n, logits = 2000, LOGITS * 20  # a model's logits reach tens
    tokens, _ = sample(logits.expand(n, -1), [SampleRequest(SamplingParams(**case), seed) for seed in range(n)])
    assert set(tokens) == {int(logits.argmax())}


@pytest.mark.parametrize("vocab", [8, 256, 300, 1000, 4096 + 17])
def test_the_two_level_inverse_cdf_equals_one_float64_cumsum(vocab):
    """Whole zero blocks, scattered zeros, weights spanning 1e-12..1, and u at both ends: the token is the one
    a single float64 cumsum over the row gives, and never a zero-weight one."""
    g = torch.Generator().manual_seed(vocab)
    rows = 64
    probs = torch.exp(torch.rand(rows, vocab, generator=g) * -28)
    probs[torch.rand(rows, vocab, generator=g) < 0.3] = 0.0
    probs[:, 256:768] = 0.0
    u = torch.rand(rows, generator=g, dtype=torch.float64)
    u[0], u[1] = 0.0, 1.0 - 2.0**-53
    got = _invert_cdf(probs, u)
    cdf = probs.double().cumsum(-1)
    ref = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1)
    ref[1] = int(torch.nonzero(probs[1]).max())  # u * total rounds to the total: the last token with weight
    assert got.tolist() == ref.tolist()
    assert bool((probs.gather(1, got[:, None]) > 0).all())


def test_draws_over_a_large_vocab_follow_the_softmax():
    """Several 256-token blocks and a partial one, every token likely enough to be counted."""
    logits = torch.rand(1000, generator=torch.Generator().manual_seed(3)) * 2 - 1
    n = 30000
    tokens, _ = sample(logits.expand(n, -1), [SampleRequest(SamplingParams(), seed) for seed in range(n)])
    _assert_follows(tokens, logits.softmax(-1).double())


def test_uniforms_are_a_hash_of_seed_and_index():
    us = [draw_uniform(3, i) for i in range(20000)]
    assert all(0.0 <= u < 1.0 for u in us) and len(set(us)) == len(us)
    assert abs(sum(us) / len(us) - 0.5) < 0.01
    assert draw_uniform(-1, 5) == draw_uniform(2**64 - 1, 5)  # a seed is taken modulo 2**64, as torch does
    neighbours = [draw_uniform(seed, 0) for seed in range(1000)]  # choice j of n samples with seed + j
    assert abs(sum(neighbours) / 1000 - 0.5) < 0.05 and len(set(neighbours)) == 1000


def _batch(v: int = 500, seed: int = 0) -> tuple[torch.Tensor, list[SampleRequest]]:
    """Rows that use everything at once: seeded, unseeded (random seeds), greedy, filters, processors (the
    request lists of logit_bias, allowed_token_ids and bad words included: their first copy to a device is in
    the step)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, v, generator=g) * 2
    unseeded = torch.randint(0, 2**62, (2,), generator=g).tolist()
    params = [
        SamplingParams(temperature=0.9, logprobs=3),
        SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, logprobs=0),
        SamplingParams(temperature=0.0, frequency_penalty=1.0, logit_bias={3: 5.0}, logprobs=5),
        SamplingParams(temperature=1.2, min_p=0.05, top_k=40, allowed_token_ids=list(range(1, v, 3))),
        SamplingParams(temperature=0.7, top_p=0.8, min_tokens=50, max_tokens=60),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, logprobs=2, bad_words_ids=[[7], [30, 33]]),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.1, min_p=0.1, repetition_penalty=0.8),
    ]
    seeds = [11, 12, 0, 13, unseeded[0], 14, 0, unseeded[1]]
    history = [list(range(i, 40 * i + 1, 3)) for i in range(8)]
    return logits, [SampleRequest(p, s, 0, h[:5], h[5:]) for p, s, h in zip(params, seeds, history, strict=True)]


def test_a_seeded_row_draws_the_same_alone_and_in_any_batch():
    logits, reqs = _batch()
    for index in range(6):
        for r in reqs:
            r.index = index
        batched, _ = sample(logits, reqs, EOS)
        for i in range(len(reqs)):
            assert sample(logits[i : i + 1], [reqs[i]], EOS)[0] == [batched[i]], (index, i)
        # the rows again, in another order and beside other rows: each still draws its own token
        others, more = _batch(seed=1)
        order = [5, 0, 7, 3, 1, 6, 4, 2]
        mixed, _ = sample(torch.cat([logits[order], others]), [reqs[i] for i in order] + more, EOS)
        assert mixed[: len(order)] == [batched[i] for i in order], index


def test_logprobs_are_the_raw_log_softmax_whatever_the_processors():
    logits, reqs = _batch()
    tokens, logprobs = sample(logits, reqs, EOS)
    ref = torch.log_softmax(logits, dim=-1)
    for i, (r, lp) in enumerate(zip(reqs, logprobs, strict=True)):
        if r.params.logprobs is None:
            assert lp is None
            continue
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(float(ref[i, tokens[i]]), abs=1e-5)
        values, ids = torch.topk(ref[i], r.params.logprobs)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-5)



def test_logprobs_of_non_finite_logits_are_finite():
    """A row of NaN/inf logits (an adapter whose weights overflow) still gives JSON-safe logprobs."""
    logits = torch.zeros(2, 8)
    logits[0, 3], logits[1] = float("inf"), float("nan")
    reqs = [SampleRequest(SamplingParams(temperature=0.0, logprobs=2)) for _ in range(2)]
    _, logprobs = sample(logits, reqs, EOS)
    for lp in logprobs:
        assert all(math.isfinite(v) for v in [lp.logprob, *(v for _, v in lp.top)])

# ops that make the host wait for a CUDA device: a value read on the host, or an output whose size depends
# on the data (a boolean index is a nonzero underneath)
SYNCING = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select", "aten::is_nonzero",
           "aten::equal", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim"}


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.bool_indexing = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        if func._schema.name == "aten::index" and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1]):
            self.bool_indexing = True
        return func(*args, **(kwargs or {}))


def test_a_step_copies_to_the_host_once_and_never_waits_otherwise(monkeypatch):
    logits, reqs = _batch()
    copies = []
    to_host = sampler._to_host

    def counted(t: torch.Tensor, ready=None) -> list:
        copies.append(t.numel())
        return to_host(t, ready)

    monkeypatch.setattr(sampler, "_to_host", counted)
    for rows in (reqs, [r for r in reqs if r.params.logprobs is None]):
        copies.clear()
        with _OpLog() as log:
            tokens, _ = sample(logits[: len(rows)], rows, EOS)
        assert len(copies) == 1 and len(tokens) == len(rows)
        assert not SYNCING & set(log.ops) and not log.bool_indexing, sorted(SYNCING & set(log.ops))
        assert "aten::sort" in log.ops and "aten::searchsorted" in log.ops  # the batched path did run


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_syncs_only_for_its_one_copy(monkeypatch):
    """torch's sync debug mode raises on any synchronizing call but the final copy; the draws equal the
    CPU's (the same uniforms; a float64 cdf keeps the two within one interval for these logits)."""
    logits, reqs = _batch()
    to_host = sampler._to_host

    def unguarded(*args) -> list:
        torch.cuda.set_sync_debug_mode(0)
        return to_host(*args)

    monkeypatch.setattr(sampler, "_to_host", unguarded)
    on_device = logits.cuda()  # a copy from pageable memory: it synchronizes, outside the guarded step
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu, gpu_lp = sample(on_device, reqs, EOS)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu, cpu_lp = sample(logits, reqs, EOS)
    assert gpu == cpu
    for a, b in zip(gpu_lp, cpu_lp, strict=True):
        assert (a is None and b is None) or a.logprob == pytest.approx(b.logprob, abs=1e-4)
