"""The padded static decode path of server/model/graphs.py, run eagerly on the CPU (capture=False): the same
buffers, buckets, padding rows and in-graph LoRA metadata step that a CUDA graph replays, checked token for token
against the unpadded eager path. tests/test_engine_gpu.py covers the captured graphs on CUDA."""

from __future__ import annotations

import pytest
from engine_reference import drain

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams
from hotlora.server.model.graphs import row_buckets

PROMPTS = ["Hello, my name is", "The capital of France", "1, 2, 3, 4,", "Once upon a time", "Rain falls on"]
GREEDY = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(hotlora_cache, adapters) -> LLMEngine:
    # 4-token blocks: contexts grow past 8 and 16 blocks, so steps move between block-table width buckets;
    # max_num_seqs 6: row buckets 1, 2, 4, 6, so batches of 3 and 5 carry padding rows
    eng = LLMEngine(EngineConfig(model="default", quant="none", cache_dir=hotlora_cache, max_loras=4,
                                 max_lora_rank=16, max_num_seqs=6, block_size=4, kv_cache_memory=0.1))  # fmt: skip
    for name, path in adapters.items():
        eng.registry.register(name, path)
    return eng


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


def test_padded_static_decode_matches_eager(engine):
    names = ["qv8", None, "all16", "qv8", "mlp4rs"]
    assert engine.runner.graphs is None  # the CPU decodes eagerly by default
    eager = _staggered(engine, names)
    graphs = engine.runner.decode_graphs(capture=False)
    engine.runner.graphs = graphs
    try:
        static = _staggered(engine, names)
    finally:
        engine.runner.graphs = None
    assert static == eager
    assert all(len(t) == GREEDY.max_tokens for t in static.values())
    keys = set(graphs.buckets)
    assert {rows for rows, _, _ in keys} >= {2, 4, 6}, keys  # padded batches of 3 and 5 ran
    assert {width for _, width, _ in keys} >= {8, 16}, keys  # contexts crossed a width bucket
    assert any(lora for _, _, lora in keys)
    assert engine.blocks.num_used == 0


def test_base_only_batches_skip_lora(engine):
    graphs = engine.runner.decode_graphs(capture=False)
    engine.runner.graphs = graphs
    try:
        tokens = _staggered(engine, [None] * len(PROMPTS))
    finally:
        engine.runner.graphs = None
    assert all(len(t) == GREEDY.max_tokens for t in tokens.values())
    assert graphs.buckets and not any(lora for _, _, lora in graphs.buckets)
