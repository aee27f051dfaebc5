"""The engine against transformers + peft: one mixed batch, each request generated alone by the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_reference import ADAPTER_SPECS, Reference, save_adapters
from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams

N_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colours:",
    "The quick brown fox",
    "Water boils at",
]


@pytest.fixture(scope="module")
def adapters(default_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    return save_adapters(default_model_dir, tmp_path_factory.mktemp("adapters"))


def _mixed_requests(tokenizer) -> list[tuple[list[int], str | None]]:
    names: list[str | None] = [*ADAPTER_SPECS, None, "qv8"]  # four adapters, the base, and one adapter twice
    return [(tokenizer.encode(p), a) for p, a in zip(PROMPTS, names, strict=True)]


def _engine_greedy(engine: LLMEngine, work: list[tuple[list[int], str | None]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
    reqs = [Request(f"r{i}", ids, params, adapter) for i, (ids, adapter) in enumerate(work)]
    outs = engine.generate(reqs)
    assert all(o.finish_reason.value == "length" for o in outs)
    return [o.new_token_ids for o in outs]


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_mixed_adapter_batch_matches_peft(quant: str, adapters, default_model_dir, hotlora_cache):
    engine = LLMEngine(
        EngineConfig(
            model="default", quant=quant, cache_dir=hotlora_cache, max_loras=4, max_lora_rank=16, kv_cache_memory=0.25
        )
    )
    for name, path in adapters.items():
        engine.registry.register(name, path)
    work = _mixed_requests(engine.tokenizer)
    got = _engine_greedy(engine, work)
    assert engine.blocks.num_used == 0

    ref = Reference(default_model_dir, adapters, quant)
    for (ids, adapter), tokens in zip(work, got, strict=True):
        want = ref.greedy(ids, adapter, N_TOKENS)
        assert tokens == want, f"adapter {adapter}: engine {tokens} != peft {want}"
    # the adapters really change the output (otherwise the comparison above proves little)
    base_alone = ref.greedy(work[0][0], None, N_TOKENS)
    assert got[0] != base_alone
