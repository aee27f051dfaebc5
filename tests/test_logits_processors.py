"""The sampler's batched logits processors against independent references: transformers' processors
(repetition penalty, min-p, the min-new-tokens EOS mask), OpenAI's documented presence/frequency formula,
and logit_bias by hand. Batches mix rows with and without each processor; seeded draws do not depend on
what shares the batch."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers import (
    AutoTokenizer,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
)

from hotlora.server.engine.types import MAX_REPETITION_PENALTY, SamplingParams, StructuredSpec
from hotlora.server.model.grammar import GrammarCache, apply_grammars
from hotlora.server.model.logits import RowTokens, build_processors, temperature_min_p
from hotlora.server.model.sampler import SampleRequest, process, sample

V = 64
EOS = {2}


def _rows(n: int, seed: int = 0) -> tuple[torch.Tensor, list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g) * 3
    prompts = [torch.randint(0, V, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    outputs = [torch.randint(0, V, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    return logits, prompts, outputs


def _requests(params: list[SamplingParams], prompts, outputs, seeds=None) -> list[SampleRequest]:
    seeds = seeds or [0] * len(params)
    return [SampleRequest(p, s, len(out), pr, out)
            for p, pr, out, s in zip(params, prompts, outputs, seeds, strict=True)]


def test_repetition_penalty_matches_transformers():
    logits, prompts, outputs = _rows(6)
    penalties = [1.0, 1.3, 0.7, 2.0, 1.0, 1.1]
    params = [SamplingParams(repetition_penalty=r) for r in penalties]
    got = process(logits, _requests(params, prompts, outputs), EOS)
    for i, r in enumerate(penalties):
        ids = torch.tensor([prompts[i] + outputs[i]])
        ref = RepetitionPenaltyLogitsProcessor(r)(ids, logits[i : i + 1].clone())[0]
        torch.testing.assert_close(got[i], ref)


def test_presence_and_frequency_follow_openai_formula():
    logits, prompts, outputs = _rows(6, seed=1)
    pairs = [(0.0, 0.0), (0.5, 0.0), (0.0, 1.5), (-1.0, 2.0), (2.0, -2.0), (0.0, 0.0)]
    params = [SamplingParams(presence_penalty=p, frequency_penalty=f) for p, f in pairs]
    got = process(logits, _requests(params, prompts, outputs), EOS)
    for i, (pres, freq) in enumerate(pairs):
        # mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence; c over generated tokens
        counts = Counter(outputs[i])
        ref = [float(logits[i, j]) - counts[j] * freq - (counts[j] > 0) * pres for j in range(V)]
        torch.testing.assert_close(got[i], torch.tensor(ref))


def test_logit_bias_adds_to_the_listed_tokens_only():
    logits, prompts, outputs = _rows(3, seed=2)
    biases = [{5: 100.0, 7: -3.5}, {}, {63: -100.0, 0: 0.25}]
    got = process(logits, _requests([SamplingParams(logit_bias=b) for b in biases], prompts, outputs), EOS)
    for i, b in enumerate(biases):
        ref = logits[i].clone()
        for t, v in b.items():
            ref[t] += v
        torch.testing.assert_close(got[i], ref)
    # the same dicts again (their tensors now cached), in the other order: each row still gets its own bias
    back = process(logits.flip(0), _requests([SamplingParams(logit_bias=b) for b in biases[::-1]], prompts[::-1],
                                             outputs[::-1]), EOS)
    torch.testing.assert_close(back, got.flip(0))


def test_min_tokens_masks_eos_and_stop_ids_like_transformers():
    logits, prompts, outputs = _rows(5, seed=3)
    mins = [0, 4, 100, 3, 20]
    stop_ids = [[], [9], [9, 11], [], [1]]
    params = [SamplingParams(max_tokens=100, min_tokens=m, stop_token_ids=s)
              for m, s in zip(mins, stop_ids, strict=True)]
    got = process(logits, _requests(params, prompts, outputs), EOS)
    for i in range(5):
        ids = torch.tensor([prompts[i] + outputs[i]])
        proc = MinNewTokensLengthLogitsProcessor(len(prompts[i]), mins[i], sorted(EOS | set(stop_ids[i])))
        torch.testing.assert_close(got[i], proc(ids, logits[i : i + 1].clone())[0])


def test_min_tokens_never_empties_a_row():
    """A grammar that can only end leaves EOS as the row's one token: min_tokens must not mask it too."""
    logits, prompts, outputs = _rows(2, seed=6)
    only_eos = torch.full((V,), float("-inf"))
    only_eos[2] = 1.5
    logits[0] = only_eos
    params = [SamplingParams(max_tokens=50, min_tokens=40)] * 2
    got = process(logits, _requests(params, prompts, outputs), EOS)
    torch.testing.assert_close(got[0], only_eos)
    assert got[1, 2] == float("-inf") and torch.isfinite(got[1, 3:]).all()


def test_min_p_matches_transformers_after_temperature():
    logits, _, _ = _rows(5, seed=4)
    settings = [(0.0, 1.0), (0.1, 1.0), (0.05, 0.7), (0.5, 1.5), (1.0, 1.0)]
    params = [SamplingParams(min_p=m, temperature=t) for m, t in settings]
    got = temperature_min_p(logits, params)
    for i, (m, t) in enumerate(settings):
        scaled = logits[i : i + 1] / t
        ref = MinPLogitsWarper(m)(torch.zeros(1, 1, dtype=torch.long), scaled.clone())[0] if m > 0 else scaled[0]
        torch.testing.assert_close(got[i], ref)


def _mixed() -> tuple[torch.Tensor, list[SamplingParams], list[list[int]], list[list[int]]]:
    logits, prompts, outputs = _rows(8, seed=5)
    params = [
        SamplingParams(temperature=0.9, seed=1),
        SamplingParams(temperature=1.0, repetition_penalty=1.4, presence_penalty=0.5, seed=2),
        SamplingParams(temperature=0.0, frequency_penalty=1.0, logit_bias={3: 5.0}),
        SamplingParams(temperature=1.2, min_p=0.1, top_k=10, seed=3),
        SamplingParams(temperature=0.7, top_p=0.8, min_tokens=50, max_tokens=60, seed=4),
        SamplingParams(temperature=1.0, logit_bias={7: 100.0}, seed=5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, min_p=0.2, repetition_penalty=0.8, seed=6),
    ]
    return logits, params, prompts, outputs


def test_mixed_batch_rows_equal_each_row_alone():
    logits, params, prompts, outputs = _mixed()
    seeds = list(range(len(params)))
    batch, _ = sample(logits, _requests(params, prompts, outputs, seeds), EOS)
    alone = [sample(logits[i : i + 1], _requests([params[i]], [prompts[i]], [outputs[i]], [seeds[i]]), EOS)[0][0]
             for i in range(len(params))]
    assert batch == alone
    assert batch[5] == 7  # a +100 bias wins over every other logit
    processed = process(logits, _requests(params, prompts, outputs), EOS)
    assert batch[2] == int(processed[2].argmax()) and batch[6] == int(logits[6].argmax())


def test_seeded_draws_do_not_depend_on_processors_elsewhere():
    logits, params, prompts, outputs = _mixed()
    seeded = SamplingParams(temperature=1.0, seed=42)
    draws = []
    for k in (0, 3, 7):  # alone, then with more and more rows using other processors
        reqs = _requests([seeded, *params[1 : 1 + k]], prompts[: 1 + k], outputs[: 1 + k], [42] + [9] * k)
        steps = []
        for index in range(4):  # the next tokens of the seeded stream go on identically too
            reqs[0].index = index
            steps.append(sample(logits[: 1 + k], reqs, EOS)[0][0])
        draws.append(tuple(steps))
    assert len(set(draws)) == 1 and len(set(draws[0])) > 1  # and the stream moves on from token to token


def test_params_are_validated():
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0),
                dict(repetition_penalty=1e-300), dict(repetition_penalty=0.009),
                dict(min_p=1.5), dict(min_tokens=5, max_tokens=4), dict(logit_bias={1: 101.0}),
                dict(logit_bias={i: 1.0 for i in range(301)})):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_smallest_repetition_penalty_keeps_logits_finite_and_draws_a_seen_token():
    """At the lowest penalty accepted (1 / MAX_REPETITION_PENALTY) a seen token's positive logit is scaled up,
    not to inf: a row of several infs has a NaN softmax, which drew the vocabulary's last token."""
    logits = torch.full((1, V), -1.0)
    logits[0, [3, 5, 7]] = 30.0
    params = [SamplingParams(temperature=1.0, repetition_penalty=1 / MAX_REPETITION_PENALTY)]
    reqs = _requests(params, [[3, 5, 7]], [[]], [11])
    assert torch.isfinite(process(logits, reqs, EOS)).all()
    assert sample(logits, reqs, EOS)[0][0] in (3, 5, 7)


def test_grammar_bitmask_forbids_exactly_what_the_matcher_forbids(default_model_dir):
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    cache = GrammarCache(tok, tok.vocab_size, {tok.eos_token_id})
    spec = StructuredSpec("choice", json.dumps(["yes", "no"]))
    matchers = [None, cache.matcher(spec), None]
    logits = torch.randn(3, tok.vocab_size)
    out = apply_grammars(logits, matchers)
    torch.testing.assert_close(out[0], logits[0])
    torch.testing.assert_close(out[2], logits[2])
    allowed = set(torch.nonzero(out[1] > float("-inf")).flatten().tolist())
    assert allowed and all("yes".startswith(tok.decode([t])) or "no".startswith(tok.decode([t])) for t in allowed)
    assert cache.compile(spec) is cache.compile(StructuredSpec("choice", json.dumps(["yes", "no"])))  # cached
    cache.max_entries = 2  # least recently used goes first
    others = [StructuredSpec("regex", r) for r in ("a+", "b+")]
    first = cache.compile(spec)
    cache.compile(others[0])
    cache.compile(spec)  # used again: now the newest
    cache.compile(others[1])  # evicts others[0], not spec
    assert cache.compile(spec) is first
    with pytest.raises(ValueError, match="invalid regex"):
        cache.compile(StructuredSpec("regex", "(unclosed"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_processors_on_cuda_match_the_cpu():
    logits, params, prompts, outputs = _mixed()
    cpu = process(logits, _requests(params, prompts, outputs), EOS)
    gpu = process(logits.cuda(), _requests(params, prompts, outputs), EOS)
    torch.testing.assert_close(gpu.cpu(), cpu)
    torch.testing.assert_close(temperature_min_p(logits.cuda(), params).cpu(), temperature_min_p(logits, params))


def test_token_history_tracks_each_sequence_and_is_dropped_with_it():
    import gc

    from hotlora.server.engine.sequence import Sequence
    from hotlora.server.model.history import TokenHistory

    history = TokenHistory()
    seq = Sequence("s", list(range(5, 70)), SamplingParams(), None, 0)
    assert history.ids(seq).tolist() == seq.token_ids
    for t in range(200):  # past the first buffer's capacity, one token a step as the engine appends them
        seq.token_ids.append(t)
        assert history.ids(seq).tolist() == seq.token_ids
    rows = [RowTokens(SamplingParams(repetition_penalty=2.0), history.ids(seq)[:65], history.ids(seq)[65:])]
    as_lists = [RowTokens(SamplingParams(repetition_penalty=2.0), seq.token_ids[:65], seq.token_ids[65:])]
    logits = torch.randn(1, 300)
    penalized = build_processors(rows, 300, set(), logits.device).apply(logits)
    torch.testing.assert_close(penalized, build_processors(as_lists, 300, set(), logits.device).apply(logits),
                               rtol=0, atol=0)
    del seq, rows
    gc.collect()
    assert len(history._bufs) == 0
