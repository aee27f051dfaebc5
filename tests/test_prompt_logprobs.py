"""Prompt logprobs (completions' echo with logprobs) in the engine, on the default model with peft adapters:
the logprob of every prompt token after the first, against transformers + peft teacher-forced on the same
prompt; unchanged by chunked prefill, preemption and recompute, and by a prefix cache that already holds
the prompt (its KV is reused by others, but a scoring prompt is computed in full)."""

from __future__ import annotations

import random

import pytest
import torch
from engine_reference import Reference, default_engine

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, RequestOutput, SamplingParams

TOP = 3
TEXTS = ("The quick brown fox jumps over the lazy dog, and then it runs back home to sleep by the fire.",
         "Paris is the capital of", "Hi")


@pytest.fixture(scope="module")
def engine(hotlora_cache, adapters) -> LLMEngine:
    return default_engine(hotlora_cache, adapters)


def _requests(tok, tag: str, max_tokens: int = 3) -> list[Request]:
    """Prompts of different lengths on the base and adapters, with and without prompt logprobs, one batch."""
    specs = [(TEXTS[0], "all16", TOP), (TEXTS[1], None, 0), (TEXTS[0], None, None), (TEXTS[1], "qv8", TOP),
             (TEXTS[2], "mlp4rs", TOP)]
    return [Request(f"{tag}{i}", tok.encode(text), SamplingParams(max_tokens, temperature=0.0, logprobs=0,
                                                                  prompt_logprobs=k), adapter)
            for i, (text, adapter, k) in enumerate(specs)]


def _scores(out: RequestOutput) -> list[tuple[int, float, list[int]]]:
    return [(lp.token_id, lp.logprob, [t for t, _ in lp.top]) for lp in (out.prompt_logprobs or [None])[1:]]


def test_prompt_logprobs_match_transformers(engine, default_model_dir, adapters):
    reqs = _requests(engine.tokenizer, "r")
    outs = engine.generate(reqs)
    ref = Reference(default_model_dir, adapters, "none")
    for req, out in zip(reqs, outs, strict=True):
        k = req.params.prompt_logprobs
        if k is None:
            assert out.prompt_logprobs is None
            continue
        ids = req.prompt_token_ids
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        expected = ref.score(ids[:1], ids[1:], req.adapter)  # [len(ids) - 1, vocab]
        for pos, lp in enumerate(out.prompt_logprobs[1:]):
            assert lp.token_id == ids[pos + 1]
            assert lp.logprob == pytest.approx(float(expected[pos, ids[pos + 1]]), abs=2e-4)
            # the k best, best first: the reference's top-k values, and each id's own reference logprob
            got_ids, got_values = [t for t, _ in lp.top], torch.tensor([v for _, v in lp.top])
            torch.testing.assert_close(got_values, torch.topk(expected[pos], k).values, atol=2e-4, rtol=0)
            torch.testing.assert_close(got_values, expected[pos, got_ids], atol=2e-4, rtol=0)
        # the generated tokens' logprobs are scored from the same distribution that follows the prompt
        assert out.logprobs[0].logprob == pytest.approx(
            float(ref.score(ids, out.new_token_ids[:1], req.adapter)[0, out.new_token_ids[0]]), abs=2e-4)


def test_chunking_preemption_and_the_prefix_cache_change_nothing(engine, hotlora_cache, adapters):
    roomy = {o.request_id[1:]: _scores(o) for o in engine.generate(_requests(engine.tokenizer, "a", 12))}
    small = default_engine(hotlora_cache, adapters, num_kv_blocks=10, block_size=4, max_num_batched_tokens=8)
    # the long prompt is in the prefix cache first: the scoring requests must still compute it in full
    warm = Request("warm", small.tokenizer.encode(TEXTS[0]), SamplingParams(max_tokens=1, temperature=0.0))
    small.generate([warm])
    cramped = {o.request_id[1:]: _scores(o) for o in small.generate(_requests(small.tokenizer, "b", 12))}
    assert small.scheduler.num_preemptions > 0 and small.blocks.hits > 0
    assert cramped.keys() == roomy.keys()
    for key, scores in roomy.items():
        assert [s[0] for s in cramped[key]] == [s[0] for s in scores]
        assert [s[2] for s in cramped[key]] == [s[2] for s in scores]
        torch.testing.assert_close(torch.tensor([s[1] for s in cramped[key]]), torch.tensor([s[1] for s in scores]),
                                   atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scoring_steps_run_eagerly_and_agree_with_forced_tokens(gpu_model_dir, hotlora_cache):
    """On CUDA with graphs: a scoring step runs eagerly, the rest still replay; the last prompt token's logprob
    equals that of the same token forced (logit_bias) as the first generated token after the rest."""
    # the GPU tests' random model (conftest.gpu_model_dir): its embeddings are scaled down, as std-1 ones give
    # logits of ~150, where a bf16 step is 1 nat
    engine = LLMEngine(EngineConfig(model=str(gpu_model_dir), quant="nf4", cache_dir=hotlora_cache, device="cuda",
                                    dtype="bfloat16", max_num_seqs=4, max_num_batched_tokens=64, kv_cache_memory=0.1))
    ids = [random.Random(5).randrange(3, 49152) for _ in range(150)]  # three 64-token prefill chunks
    scored = Request("s", ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=2))
    forced = Request("f", ids[:-1], SamplingParams(max_tokens=1, temperature=0.0, logprobs=0,
                                                   logit_bias={ids[-1]: 100.0}))
    before = engine.eager_steps
    out, ref = engine.generate([scored]), engine.generate([forced])
    lps = out[0].prompt_logprobs
    assert len(lps) == len(ids) and lps[0] is None and [lp.token_id for lp in lps[1:]] == ids[1:]
    assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in lps[1:])
    assert engine.eager_steps - before == 3  # the prefill chunks; the decodes and the forced request replay
    assert ref[0].new_token_ids == [ids[-1]]
    # bf16 on a random-weight model, two step shapes (a prefill chunk against a decode): logprobs of ~-11
    assert lps[-1].logprob == pytest.approx(ref[0].logprobs[0].logprob, abs=0.25)
