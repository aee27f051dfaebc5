"""Prefix caching on the real default model (CPU, greedy): every output equals the one with caching off,
blocks are never shared across adapter versions, and nothing leaks."""

from __future__ import annotations

import random
import time

import pytest
from engine_reference import drain

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.sequence import Sequence
from hotlora.server.engine.types import Request, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
SYSTEM = ("You are a careful assistant for a small bakery. Answer in one short sentence, mention prices in "
          "euros, never invent products, and say so when you do not know. Opening hours: 7 to 19, closed on "
          "Mondays. Products: bread, croissants, apple pie, rye loaves, seasonal cakes.\n\nQuestion: ")
QUESTIONS = ["When do you open?", "Do you sell rye bread?", "How much is a croissant?",
             "Are you open on Monday?", "Do you have cakes?", "Can I order a pie?"]


def _engine(cache, caching: bool, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_memory", 0.25)
    return LLMEngine(EngineConfig(model="default", quant="none", cache_dir=cache, max_loras=2, max_lora_rank=8,
                                  enable_prefix_caching=caching, **kw))


_ENGINES: list[LLMEngine] = []  # this module's engines, checked for leaks after every test


@pytest.fixture(scope="module", autouse=True)
def _forget_engines():
    yield
    _ENGINES.clear()  # let the module's engines go when it is done


@pytest.fixture(scope="module")
def on(hotlora_cache) -> LLMEngine:
    _ENGINES.append(_engine(hotlora_cache, True))
    return _ENGINES[-1]


@pytest.fixture(scope="module")
def off(hotlora_cache) -> LLMEngine:
    _ENGINES.append(_engine(hotlora_cache, False))
    return _ENGINES[-1]


@pytest.fixture(scope="module")
def small(hotlora_cache) -> LLMEngine:
    """Blocks of 4 tokens, 8 tokens per step (chunked prefill), a KV cache too small for 3 sequences."""
    _ENGINES.append(_engine(hotlora_cache, True, num_kv_blocks=14, block_size=4, max_num_batched_tokens=8))
    return _ENGINES[-1]


@pytest.fixture(autouse=True)
def no_leak():
    yield
    for engine in _ENGINES:
        assert not engine.has_unfinished()
        engine.blocks.check_idle()  # every block free or cached-free, every ref-count zero


def _alone(engine: LLMEngine, prompts: list[list[int]], adapter: str | None = None, tag: str = "") -> list[list[int]]:
    """Each prompt generated with nothing else in the engine."""
    return [engine.generate([Request(f"alone{tag}{i}", p, GREEDY, adapter)])[0].new_token_ids
            for i, p in enumerate(prompts)]


def _run_tracked(engine: LLMEngine, rid: str, prompt: list[int], adapter: str | None) -> tuple[list[int], Sequence,
                                                                                               set[int]]:
    """Run one request alone; its tokens, its Sequence, and every block it held on the way."""
    engine.add_request(Request(rid, prompt, GREEDY, adapter))
    seq, held, tokens = engine.seqs[rid], set(), []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            tokens += out.new_token_ids
        held |= set(seq.block_table)
    return tokens, seq, held


def test_shared_system_prompt_across_many_requests(on, off):
    tok = on.tokenizer
    prompts = [tok.encode(SYSTEM + q) for q in QUESTIONS]
    hits0 = on.blocks.hits
    got = drain(on, {2 * i: [Request(f"sys{i}", p, GREEDY)] for i, p in enumerate(prompts)})
    assert [got[f"sys{i}"] for i in range(len(prompts))] == _alone(off, prompts)
    shared = len(tok.encode(SYSTEM)) // 16 * 16 - 16  # whole blocks of the system prompt, at least
    assert on.blocks.hits - hits0 >= (len(prompts) - 1) * shared > 0
    outs = on.generate([Request("sys-again", prompts[0], GREEDY)])
    assert outs[0].cached_tokens == (len(prompts[0]) - 1) // 16 * 16 and outs[0].new_token_ids == got["sys0"]


def test_same_prompt_on_two_adapters_shares_no_block(on, off, peft_dirs):
    engine = on
    for name in ("a", "x"):
        for e in (on, off):
            e.registry.register(name, peft_dirs[name])
    prompt = engine.tokenizer.encode("Two adapters, one prompt. " + SYSTEM + QUESTIONS[0])
    runs = {name: _run_tracked(engine, f"two-{name}", prompt, name) for name in ("a", "x", None)}
    keys = {name: set(seq.block_hashes) for name, (_, seq, _) in runs.items()}
    assert not (keys["a"] & keys["x"] or keys["a"] & keys[None] or keys["x"] & keys[None])
    registered = {name: {engine.blocks.cached[k] for k in keys[name] if k in engine.blocks.cached} for name in runs}
    assert all(len(blocks) >= len(prompt) // 16 for blocks in registered.values())  # nothing was evicted ...
    for name, (_, seq, held) in runs.items():
        assert seq.num_cached_tokens == 0  # ... and yet nobody mapped another's blocks
        assert not held & set().union(*(registered[o] for o in runs if o != name))
    for name, (tokens, _, _) in runs.items():
        assert tokens == _alone(off, [prompt], name, f"two-{name}")[0]
    again, seq, _ = _run_tracked(engine, "two-a-again", prompt, "a")  # the same version does reuse
    assert seq.num_cached_tokens > 0 and again == runs["a"][0]


def test_hot_swap_never_reuses_the_old_version(on, off, peft_dirs):
    prompt = on.tokenizer.encode(SYSTEM + QUESTIONS[1])
    on.registry.register("swap", peft_dirs["a"])
    _, old, _ = _run_tracked(on, "swap-old", prompt, "swap")
    for version in ("x", "a"):  # a new upload, then the old weights again: each a new version, no reuse
        on.registry.register("swap", peft_dirs[version])
        off.registry.register("swap", peft_dirs[version])
        tokens, seq, _held = _run_tracked(on, f"swap-{version}", prompt, "swap")
        assert seq.num_cached_tokens == 0 and not set(seq.block_hashes) & set(old.block_hashes)
        assert tokens == _alone(off, [prompt], "swap", f"swap-{version}")[0]
    tokens, seq, _ = _run_tracked(on, "swap-a-again", prompt, "swap")
    assert seq.num_cached_tokens > 0 and tokens == _alone(off, [prompt], "swap", "swap-a-again")[0]


def test_preemption_under_a_small_kv_cache(small, off):
    tok = small.tokenizer
    prompts = [tok.encode(SYSTEM[:60] + q) for q in QUESTIONS[:4]]
    got = drain(small, {0: [Request(f"pre{i}", p, GREEDY) for i, p in enumerate(prompts)]})
    assert small.scheduler.num_preemptions > 0 and small.blocks.hits > 0
    assert [got[f"pre{i}"] for i in range(len(prompts))] == _alone(off, prompts)


def _step(engine: LLMEngine, tokens: dict[str, list[int]]) -> None:
    for out in engine.step():
        assert out.error is None, out.error
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)


def test_abort_mid_prefill(small, off):
    tok = small.tokenizer
    prompt = tok.encode("Abort, mid-prefill. " + SYSTEM[:100] + QUESTIONS[2])
    sib_prompt = prompt[:8] + tok.encode(" Hello there")
    tokens: dict[str, list[int]] = {}
    small.add_request(Request("sibling", sib_prompt, GREEDY))
    while small.seqs["sibling"].num_computed < len(sib_prompt):
        _step(small, tokens)
    small.add_request(Request("doomed", prompt, GREEDY))
    doomed = small.seqs["doomed"]
    _step(small, tokens)
    _step(small, tokens)  # the sibling decodes, the doomed one prefills 7 tokens a step
    assert doomed.num_cached_tokens == 8 and 8 < doomed.num_computed < len(prompt) and "doomed" not in tokens
    shared = doomed.block_table[:2]
    assert [small.blocks.ref_counts[b] for b in shared] == [2, 2]
    small.abort("doomed")
    assert [small.blocks.ref_counts[b] for b in shared] == [1, 1]  # the sibling still holds them
    small.add_request(Request("retry", prompt, GREEDY))
    retry = small.seqs["retry"]
    while small.has_unfinished():
        _step(small, tokens)
    assert retry.num_cached_tokens == doomed.num_computed // 4 * 4  # every full block the doomed one computed
    assert tokens["retry"] == _alone(off, [prompt], tag="abort")[0]
    assert tokens["sibling"] == _alone(off, [sib_prompt], tag="sib")[0]


def test_prompt_an_exact_multiple_of_the_block_size(on, off):
    rng = random.Random(3)
    for length in (16, 48):
        prompt = [rng.randrange(100, 40000) for _ in range(length)]
        ref = _alone(off, [prompt], tag=f"exact{length}")[0]
        first, second = on.generate([Request(f"exact{length}a", prompt, GREEDY)]), on.generate(
            [Request(f"exact{length}b", prompt, GREEDY)])
        assert first[0].cached_tokens == 0 and second[0].cached_tokens == length - 16  # the last block is redone
        assert first[0].new_token_ids == second[0].new_token_ids == ref


def test_concurrent_requests_race_for_the_same_prefix(on, off):
    rng = random.Random(4)
    prefix = [rng.randrange(100, 40000) for _ in range(40)]
    prompts = [prefix, prefix, [*prefix, 11, 12, 13], [*prefix[:33], 14]]
    got = drain(on, {0: [Request(f"race{i}", p, GREEDY) for i, p in enumerate(prompts)]})
    assert [got[f"race{i}"] for i in range(len(prompts))] == _alone(off, prompts, tag="race")
    late = on.generate([Request("race-late", [*prefix, 15], GREEDY)])[0]
    assert late.cached_tokens == 32 and late.new_token_ids == _alone(off, [[*prefix, 15]], tag="late")[0]


def test_prefill_time_drops_with_a_shared_512_token_prefix(on, off):
    """16 requests: a 512-token prefix + their own 16 tokens. The first fills the cache, the other 15 arrive
    together. Summed prefill time (all the steps: one output token each) at least 5x lower, in one run."""
    rng = random.Random(5)
    prefix = [rng.randrange(100, 40000) for _ in range(512)]
    prompts = [prefix + [rng.randrange(100, 40000) for _ in range(16)] for _ in range(16)]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    elapsed, outs, stats = {}, {}, {}
    for name, engine in (("off", off), ("on", on)):
        before = engine.stats()
        start = time.perf_counter()
        first = engine.generate([Request(f"speed-{name}0", prompts[0], one)])
        rest = engine.generate([Request(f"speed-{name}{i}", p, one) for i, p in enumerate(prompts[1:], 1)])
        elapsed[name] = time.perf_counter() - start
        outs[name] = [o.new_token_ids for o in first + rest]
        after = engine.stats()
        stats[name] = (after.prefix_cache_queries - before.prefix_cache_queries,
                       after.prefix_cache_hits - before.prefix_cache_hits)
    assert outs["on"] == outs["off"]
    assert stats == {"off": (0, 0), "on": (16 * 528, 15 * 512)}
    assert elapsed["off"] / elapsed["on"] >= 5.0, elapsed


def test_scoring_prompts_are_not_counted_as_prefix_cache_queries(on):
    """A prompt whose logprobs are asked for is computed whole (match() skips the cache for it), so it is no query:
    counted, it lowered the hit rate with tokens that could never hit (vLLM does not count them either)."""
    prompt = [random.Random(9).randrange(100, 40000) for _ in range(40)]
    before = on.stats()
    on.generate([Request("score", prompt, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))])
    after = on.stats()
    assert (after.prefix_cache_queries, after.prefix_cache_hits) == (before.prefix_cache_queries,
                                                                     before.prefix_cache_hits)
    on.generate([Request("plain", prompt, SamplingParams(max_tokens=1, temperature=0.0))])
    assert on.stats().prefix_cache_queries == after.prefix_cache_queries + len(prompt)
