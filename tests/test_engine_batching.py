"""Continuous batching on the real default model: staggered arrivals, chunked prefill, preemption, abort, seeds."""

from __future__ import annotations

import pytest
from engine_reference import VARIED_PROMPTS as PROMPTS
from engine_reference import drain

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import FinishReason, Request, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _engine(cache, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_memory", 0.1)
    return LLMEngine(EngineConfig(model="default", quant="none", cache_dir=cache, max_loras=2, max_lora_rank=8, **kw))


@pytest.fixture(scope="module")
def engine(hotlora_cache) -> LLMEngine:
    return _engine(hotlora_cache)


@pytest.fixture(scope="module")
def alone(engine) -> list[list[int]]:
    """Each prompt generated with nothing else in the engine."""
    out = []
    for i, p in enumerate(PROMPTS):
        (o,) = engine.generate([Request(f"alone{i}", engine.tokenizer.encode(p), GREEDY)])
        out.append(o.new_token_ids)
    return out


def test_staggered_arrivals_match_running_alone(engine, alone):
    tok = engine.tokenizer
    arrivals = {3 * i: [Request(f"s{i}", tok.encode(p), GREEDY)] for i, p in enumerate(PROMPTS)}
    got = drain(engine, arrivals)
    assert [got[f"s{i}"] for i in range(len(PROMPTS))] == alone
    assert engine.blocks.num_used == 0


def test_preemption_and_chunked_prefill_keep_outputs(hotlora_cache, alone):
    # 6 blocks of 4 tokens: not enough for five sequences of ~25 tokens at once -> preemption;
    # 8 tokens per step -> every prompt is prefilled in chunks.
    small = _engine(hotlora_cache, num_kv_blocks=12, block_size=4, max_num_batched_tokens=8)
    tok = small.tokenizer
    got = drain(small, {0: [Request(f"p{i}", tok.encode(p), GREEDY) for i, p in enumerate(PROMPTS)]})
    assert small.scheduler.num_preemptions > 0
    assert [got[f"p{i}"] for i in range(len(PROMPTS))] == alone
    assert small.blocks.num_used == 0 and all(c == 0 for c in small.blocks.ref_counts)


def test_abort_frees_blocks_and_others_finish(engine, alone):
    tok = engine.tokenizer
    engine.add_request(Request("keep", tok.encode(PROMPTS[0]), GREEDY))
    engine.add_request(Request("drop", tok.encode(PROMPTS[1]), GREEDY))
    for _ in range(3):
        engine.step()
    engine.abort("drop")
    got = drain(engine, {})
    assert "drop" not in engine.seqs and got["keep"][-9:] == alone[0][-9:]
    assert engine.blocks.num_used == 0


def test_seeded_sampling_is_independent_of_the_batch(engine):
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    (solo,) = engine.generate([Request("solo", tok.encode(PROMPTS[3]), params)])
    others = [Request(f"o{i}", tok.encode(p), SamplingParams(max_tokens=10, temperature=1.0))
              for i, p in enumerate(PROMPTS)]
    outs = engine.generate([*others[:2], Request("seeded", tok.encode(PROMPTS[3]), params), *others[2:]])
    assert outs[2].new_token_ids == solo.new_token_ids
    different = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True)
    (other_seed,) = engine.generate([Request("seed99", tok.encode(PROMPTS[3]), different)])
    assert other_seed.new_token_ids != solo.new_token_ids



def test_unseeded_requests_draw_their_own_tokens(engine):
    """Each unseeded request gets its own random seed: identical requests in one batch diverge."""
    params = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    outs = engine.generate([Request(f"u{i}", engine.tokenizer.encode(PROMPTS[0]), params) for i in range(3)])
    assert len({tuple(o.new_token_ids) for o in outs}) == 3

def test_stop_strings_eos_and_length(engine):
    tok = engine.tokenizer
    (full,) = engine.generate([Request("full", tok.encode(PROMPTS[2]), GREEDY)])
    stop_at = full.new_text[4:8]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop_at])
    (cut,) = engine.generate([Request("cut", tok.encode(PROMPTS[2]), params)])
    assert cut.finish_reason is FinishReason.STOP
    assert cut.new_text == full.new_text[: full.new_text.index(stop_at)]
    stop_id = full.new_token_ids[3]
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_id])
    (by_id,) = engine.generate([Request("byid", tok.encode(PROMPTS[2]), params)])
    assert by_id.new_token_ids == full.new_token_ids[: full.new_token_ids.index(stop_id) + 1]
    assert by_id.finish_reason is FinishReason.STOP
    assert full.finish_reason is FinishReason.LENGTH and len(full.new_token_ids) == 12


def test_stop_strings_around_min_tokens_follow_vllm(engine):
    """vLLM's rule: a stop string counts only where it ends in the text of a token after the first min_tokens
    (it may begin before), and the text is cut where it begins. Against that rule applied to the plain greedy
    output (one character a token here): stop strings ending in token min_tokens, straddling it, or after it,
    released piece by piece."""
    tok = engine.tokenizer
    ids = tok.encode(PROMPTS[2])
    (full,) = engine.generate([Request("mt-full", ids, GREEDY)])
    assert full.new_text.startswith(" 5, 6, 7, 8,")
    upto = [tok.decode(full.new_token_ids[:i]) for i in range(len(full.new_token_ids) + 1)]

    def expected(stop: str, k: int) -> tuple[str, FinishReason]:
        at = full.new_text.find(stop, max(0, len(upto[k]) - len(stop) + 1))
        return (full.new_text, FinishReason.LENGTH) if at < 0 else (full.new_text[:at], FinishReason.STOP)

    cases = [(", ", 3), (", ", 4), (",", 2), (",", 3), (" 6,", 4), ("5, 6", 2), ("8,", 11)]
    for j, (stop, k) in enumerate(cases):
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop], min_tokens=k)
        engine.add_request(Request(f"mt{j}", ids, params))
        pieces, finish = [], None
        while engine.has_unfinished():
            for out in engine.step():
                pieces.append(out.new_text)
                finish = out.finish_reason if out.finished else finish
        assert ("".join(pieces), finish) == expected(stop, k), (stop, k)
    assert engine.blocks.num_used == 0


def test_bad_requests_are_refused_without_side_effects(engine):
    from hotlora.server.engine.engine import InvalidRequestError, PromptTooLongError, UnknownAdapterError

    with pytest.raises(PromptTooLongError):
        engine.add_request(Request("long", [1] * engine.max_model_len, GREEDY))
    with pytest.raises(UnknownAdapterError):
        engine.add_request(Request("nope", [1, 2], GREEDY, adapter="missing"))
    with pytest.raises(InvalidRequestError):
        engine.add_request(Request("vocab", [10**9], GREEDY))
    assert not engine.has_unfinished() and engine.blocks.num_used == 0
