"""The padded static step path of server/model/graphs.py, run eagerly on the CPU (capture=False): the same
buffers, token buckets, padding tokens and sequences, and in-graph LoRA metadata step that a CUDA graph replays,
for decode and mixed prefill+decode steps, checked token for token against the unpadded eager path.
tests/test_engine_gpu.py covers the captured graphs on CUDA."""

from __future__ import annotations

import pytest
from engine_reference import default_engine, drain

from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams
from hotlora.server.model.graphs import row_buckets, token_buckets

PROMPTS = ["Hello, my name is", "The capital of France", "1, 2, 3, 4,", "Once upon a time", "Rain falls on"]
GREEDY = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(hotlora_cache, adapters) -> LLMEngine:
    # 4-token blocks: tables of 2 to 13 blocks; max_num_seqs 6: token buckets 1, 2, 4, 6 for decodes, so batches
    # of 3 and 5 carry padding tokens; 8 tokens per step: prompts are chunked, chunks mix with decodes
    return default_engine(hotlora_cache, adapters, max_num_seqs=6, max_num_batched_tokens=8, block_size=4,
                          kv_cache_memory=0.1)


def _staggered(engine: LLMEngine, names: list[str | None]) -> dict[str, list[int]]:
    """Requests join two every third step while others decode, so the batch size (and its row bucket) changes."""
    pairs = enumerate(zip(PROMPTS, names, strict=True))
    reqs = [Request(f"g{i}", engine.tokenizer.encode(p), GREEDY, n) for i, (p, n) in pairs]
    return drain(engine, {3 * (i // 2): reqs[i : i + 2] for i in range(0, len(reqs), 2)})


def test_row_buckets():
    assert row_buckets(1) == [1]
    assert row_buckets(6) == [1, 2, 4, 6]
    assert row_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert row_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert token_buckets(6, 8) == [1, 2, 4, 6, 8]
    assert token_buckets(64, 2048)[10:] == [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert token_buckets(64, 40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert token_buckets(8, 64) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    assert token_buckets(1, 1) == [1]


def _static_path(engine: LLMEngine, names: list[str | None]):
    graphs = engine.runner.step_graphs(capture=False)
    engine.runner.graphs = graphs
    before = engine.runner.eager_steps, engine.runner.graph_steps
    try:
        tokens = _staggered(engine, names)
    finally:
        engine.runner.graphs = None
    eager, static = engine.runner.eager_steps - before[0], engine.runner.graph_steps - before[1]
    return tokens, graphs, eager, static


def test_padded_static_steps_match_eager(engine):
    names = ["qv8", None, "all16", "qv8", "mlp4rs"]
    assert engine.runner.graphs is None  # the CPU runs eagerly by default
    steps = engine.eager_steps
    eager = _staggered(engine, names)
    assert engine.eager_steps > steps and engine.stats().num_eager_steps == engine.eager_steps
    static, graphs, eager_steps, static_steps = _static_path(engine, names)
    assert static == eager
    assert all(len(t) == GREEDY.max_tokens for t in static.values())
    assert eager_steps == 0 and static_steps > 0  # every step fitted a bucket
    keys = {key for key, n in graphs.replays.items() if n}
    assert {tokens for tokens, decode, _ in keys if decode} >= {2, 4, 6}, keys  # padded decode batches ran
    mixed = {tokens for tokens, decode, _ in keys if not decode}
    assert 8 in mixed, keys  # prompt chunks mixed with decodes
    assert any(lora for _, _, lora in keys)
    assert engine.blocks.num_used == 0


def test_base_only_batches_skip_lora(engine):
    tokens, graphs, eager_steps, _ = _static_path(engine, [None] * len(PROMPTS))
    assert all(len(t) == GREEDY.max_tokens for t in tokens.values())
    assert eager_steps == 0
    assert graphs.buckets and not any(lora for _, _, lora in graphs.buckets)
