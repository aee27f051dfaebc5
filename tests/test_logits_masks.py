"""allowed_token_ids and bad_words (vLLM's sampling parameters) in the batched logits processors, against
references written out by hand: a restricted row keeps exactly its allowed tokens, a bad word's last token goes
to -inf exactly where the output ends with the word's other tokens (vLLM's semantics), rows without either are
untouched, and the masks compose with min_tokens, logit_bias and the penalties as the module's order says."""

from __future__ import annotations

import pytest
import torch

from hotlora.server.engine.token_rules import BadWords, bad_words_ids, refusal, token_rules
from hotlora.server.engine.types import MAX_ALLOWED_TOKEN_IDS, SamplingParams
from hotlora.server.model.logits import _allowed_row, _bias_row
from hotlora.server.model.sampler import SampleRequest, process, sample

V = 64
EOS = {2}
NEG = float("-inf")


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def _reqs(params: list[SamplingParams], outputs: list[list[int]] | None = None, seed: int = 0) -> list[SampleRequest]:
    outputs = outputs or [[] for _ in params]
    return [SampleRequest(p, seed + i, len(o), [1, 4, 9], o) for i, (p, o) in enumerate(zip(params, outputs,
                                                                                              strict=True))]


def _only(row: torch.Tensor, keep: list[int], values: torch.Tensor) -> None:
    """row holds `values` at `keep` and -inf everywhere else."""
    want = torch.full((V,), NEG)
    want[keep] = values
    torch.testing.assert_close(row, want)


def test_allowed_token_ids_keep_only_their_tokens_and_leave_other_rows_alone():
    logits = _logits(4)
    allowed = [[3, 5, 60], None, [7], None]
    params = [SamplingParams(allowed_token_ids=a) for a in allowed]
    got = process(logits, _reqs(params), EOS)
    _only(got[0], [3, 5, 60], logits[0, [3, 5, 60]])
    _only(got[2], [7], logits[2, [7]])
    torch.testing.assert_close(got[1], logits[1], rtol=0, atol=0)
    torch.testing.assert_close(got[3], logits[3], rtol=0, atol=0)
    # greedy picks the best allowed token; draws (many seeds, high temperature) never leave the allowed set
    greedy, _ = sample(logits, _reqs([SamplingParams(temperature=0.0, allowed_token_ids=[3, 5, 60])] * 4), EOS)
    assert greedy == [[3, 5, 60][int(logits[i, [3, 5, 60]].argmax())] for i in range(4)]
    drawn = {t for s in range(40) for t in sample(
        logits, _reqs([SamplingParams(temperature=2.0, top_p=0.9, allowed_token_ids=[3, 5, 60])] * 4, seed=s),
        EOS)[0]}
    assert drawn <= {3, 5, 60} and len(drawn) > 1


def test_no_row_using_a_mask_builds_no_processor():
    from hotlora.server.model.logits import RowTokens, build_processors

    rows = [RowTokens(SamplingParams(), [1], []) for _ in range(3)]
    assert build_processors(rows, V, EOS, torch.device("cpu")) is None
    assert not SamplingParams(bad_words_ids=[[4], [6]]).reads_history  # one-token words need no history
    assert SamplingParams(bad_words_ids=[[4], [6, 7]]).reads_history


def test_allowed_token_ids_come_before_logit_bias_and_penalties():
    """A disallowed token stays at -inf whatever bias or penalty it gets; allowed ones get theirs as usual."""
    logits = _logits(2, seed=1)
    params = [SamplingParams(allowed_token_ids=[7, 9], logit_bias={7: -5.0, 8: 100.0}, repetition_penalty=1.5,
                             frequency_penalty=1.0),
              SamplingParams(logit_bias={8: 100.0})]
    got = process(logits, _reqs(params, [[9, 9], [8]]), EOS)
    ref7 = logits[0, 7] - 5.0
    ref9 = logits[0, 9] / 1.5 if logits[0, 9] > 0 else logits[0, 9] * 1.5  # 9 is seen (repetition penalty)
    _only(got[0], [7, 9], torch.stack([ref7, ref9 - 2.0]))  # and twice in the output (frequency penalty)
    assert torch.isfinite(got[1]).all() and got[1, 8] == logits[1, 8] + 100.0


def test_min_tokens_masks_stop_tokens_inside_the_allowed_set_but_never_empties_it():
    logits = _logits(3, seed=2)
    params = [SamplingParams(max_tokens=8, min_tokens=4, allowed_token_ids=[2, 11]),  # EOS masked: 11 is left
              SamplingParams(max_tokens=8, min_tokens=4, allowed_token_ids=[2]),  # only EOS: it stays
              SamplingParams(max_tokens=8, min_tokens=4, allowed_token_ids=[2, 11], stop_token_ids=[11])]
    got = process(logits, _reqs(params, [[5], [5], [5]]), EOS)
    _only(got[0], [11], logits[0, [11]])
    _only(got[1], [2], logits[1, [2]])
    _only(got[2], [2, 11], logits[2, [2, 11]])  # every allowed token stops the request: none is masked
    after = process(logits, _reqs(params, [[5] * 4] * 3), EOS)  # min_tokens reached: the stop tokens are back
    _only(after[0], [2, 11], logits[0, [2, 11]])


def _bad_reference(logits: torch.Tensor, words: list[list[int]], output: list[int]) -> torch.Tensor:
    """vLLM's rule, one word at a time: the last token is banned when the output ends with the others."""
    ref = logits.clone()
    for w in words:
        if len(w) - 1 <= len(output) and (len(w) == 1 or output[len(output) - len(w) + 1 :] == w[:-1]):
            ref[w[-1]] = NEG
    return ref


@pytest.mark.parametrize("output", [[], [10], [10, 11], [11, 12], [20, 11, 12], [13, 14, 15], [14, 15], [9, 13]])
def test_bad_words_ban_a_last_token_exactly_after_the_other_tokens(output):
    words = [[4], [11, 12, 6], [12, 7], [13, 14, 15, 8], [15, 8], [40], [9, 13, 30]]
    logits = _logits(3, seed=3)
    params = [SamplingParams(bad_words_ids=words), SamplingParams(), SamplingParams(bad_words_ids=[[40]])]
    got = process(logits, _reqs(params, [output, output, output]), EOS)
    torch.testing.assert_close(got[0], _bad_reference(logits[0], words, output), rtol=0, atol=0)
    torch.testing.assert_close(got[1], logits[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2], _bad_reference(logits[2], [[40]], output), rtol=0, atol=0)
    # the index the engine checks sampled tokens with says the same, for the output as a list or a tensor
    bad = BadWords(words)
    for ids in (output, torch.tensor(output, dtype=torch.int64)):
        banned = set(bad.banned_after(ids)) | bad.single
        assert banned == {t for t in range(V) if got[0, t] == NEG and logits[0, t] != NEG}


def test_bad_words_with_allowed_ids_min_tokens_and_bias():
    """Bad words ban inside the allowed set; a banned token's +100 bias does not bring it back; min_tokens
    still masks EOS among what is left."""
    logits = _logits(1, seed=4)
    params = [SamplingParams(max_tokens=8, min_tokens=2, allowed_token_ids=[2, 5, 6, 7], bad_words_ids=[[5], [3, 6]],
                             logit_bias={5: 100.0, 7: 1.0})]
    got = process(logits, _reqs(params, [[3]]), EOS)
    _only(got[0], [7], logits[0, [7]] + 1.0)
    got = process(logits, _reqs(params, [[4]]), EOS)  # the output no longer ends with 3: 6 is allowed again
    _only(got[0], [6, 7], torch.stack([logits[0, 6], logits[0, 7] + 1.0]))


def test_bad_words_are_tokenized_at_a_text_start_and_after_a_space():
    vocab = {"cat": [5], " cat": [6], "lion": [7, 8], " lion": [9], "dog": [3, 4], " dog": [10, 4], "x": [1],
             " x": [1], "": []}
    assert bad_words_ids(vocab.__getitem__, ["cat", " lion", "dog", "x"]) == [[5], [6], [7, 8], [9], [3, 4],
                                                                               [10, 4], [1]]
    with pytest.raises(ValueError, match="'  '"):
        bad_words_ids(vocab.__getitem__, ["cat", "  "])


def test_engine_rules_and_refusals():
    rules = token_rules([3, 5, 6], [[5], [8, 6]])
    ids = [100, 101, 8]  # prompt 100, output 101 8
    assert not rules.forbid(ids, 1, 2, 6) and rules.forbid(ids, 1, 3, 6) and rules.forbid(ids, 1, 1, 5)
    assert rules.forbid(ids, 1, 3, 4) and not rules.forbid(ids, 1, 3, 3)
    assert not token_rules([6], [[8, 6]]).forbid([8], 1, 1, 6)  # the prompt's tokens do not start a word
    assert token_rules(None, []) is None
    assert refusal([3, 64], [], V) == (f"allowed_token_ids token ids must be in [0, {V}) for this model",
                                       "allowed_token_ids")
    assert refusal(None, [[1, 64]], V)[1] == "bad_words"
    assert refusal([3, 5], [[3], [5], [6, 7]], V)[1] == "bad_words"  # every allowed token is banned
    assert refusal([3, 5], [[3], [6, 5]], V) is None and refusal(None, [[3]], V) is None
    for bad in (dict(allowed_token_ids=[]), dict(allowed_token_ids=[0] * (MAX_ALLOWED_TOKEN_IDS + 1)),
                dict(allowed_token_ids=[-1]), dict(bad_words_ids=[[]]), dict(bad_words_ids=[[3, -2]]),
                dict(bad_words_ids=[[1]] * 257)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_allowed_ids_tensor_is_built_once_per_list():
    ids = [5, 9, 11]
    first = _allowed_row(ids)
    assert _allowed_row(ids) is first and first.host.tolist() == ids
    cpu = torch.device("cpu")
    assert first.on(cpu) is first.on(cpu)  # copied to a device once
    assert _allowed_row([5, 9, 11]) is not first  # another request's list: its own entry


def test_logit_bias_tensors_are_built_once_per_dict():
    bias = {4: 1.5, 9: -2.0}
    ids, values = _bias_row(bias)
    assert _bias_row(bias)[0] is ids and ids.host.tolist() == [4, 9] and values.host.tolist() == [1.5, -2.0]
    cpu = torch.device("cpu")
    assert ids.on(cpu) is ids.on(cpu) and values.on(cpu) is values.on(cpu)  # copied to a device once
    assert _bias_row({4: 1.5, 9: -2.0})[0] is not ids


def test_engine_rules_are_built_once_per_list():
    """Every choice of an API request shares its lists: their sets and bad-word index are built once (a 256-choice
    request with 4,096 allowed ids and 128 bad words took 0.58 s of the engine thread when they were not)."""
    allowed, bad = [3, 5, 7], [[3], [6, 5]]
    a, b = token_rules(allowed, bad), token_rules(allowed, bad)
    assert a.allowed is b.allowed and a.bad is b.bad
    assert token_rules([3, 5, 7], bad).allowed is not a.allowed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_on_cuda_match_the_cpu():
    logits = _logits(4, seed=5)
    params = [SamplingParams(allowed_token_ids=[2, 5, 60], min_tokens=2, max_tokens=4), SamplingParams(),
              SamplingParams(bad_words_ids=[[4], [9, 13, 30]], logit_bias={4: 50.0, 6: 3.0}),
              SamplingParams(allowed_token_ids=[2], min_tokens=3, max_tokens=4, repetition_penalty=1.3)]
    reqs = _reqs(params, [[1], [], [9, 13], [1]])
    torch.testing.assert_close(process(logits.cuda(), reqs, EOS).cpu(), process(logits, reqs, EOS))
