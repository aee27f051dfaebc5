"""Prefix caching on CUDA (decode graphs, the GPU attention path for prefills that start mid-prompt):
outputs equal caching off, token for token, and no block leaks.

The SmolLM2-135M architecture with random weights (the GPU machine has no copy of the default model), in
float32 so that the two runs' different batch shapes cannot flip a greedy near-tie.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from engine_reference import drain

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _engines(model_dir: Path, cache: Path, adapters: dict[str, Path], quant: str, **kw) -> dict[bool, LLMEngine]:
    engines = {}
    for caching in (True, False):
        engines[caching] = e = LLMEngine(EngineConfig(
            model=str(model_dir), quant=quant, cache_dir=cache, device="cuda", dtype="float32", max_loras=4,
            max_lora_rank=16, kv_cache_memory=0.05, enable_prefix_caching=caching, **kw))
        for name, path in adapters.items():
            e.registry.register(name, path)
    return engines


def _workload(rng: random.Random) -> dict[int, list[Request]]:
    """Staggered requests over two shared prefixes and three namespaces, plus four racing at step 0."""
    prefixes = [[rng.randrange(3, 49152) for _ in range(n)] for n in (200, 64)]
    names = [None, "qv8", "all16"]
    arrivals: dict[int, list[Request]] = {0: []}
    for i in range(4):  # identical prompts, all at once: they race to fill the same blocks
        arrivals[0].append(Request(f"race{i}", prefixes[1] + [7] * (i % 2), GREEDY))
    for i in range(12):
        suffix = [rng.randrange(3, 49152) for _ in range(rng.randrange(1, 40))]
        arrivals.setdefault(3 * i + 1, []).append(Request(f"r{i}", prefixes[i % 2] + suffix, GREEDY, names[i % 3]))
    arrivals[40] = [Request("exact", prefixes[1], GREEDY)]  # 64 tokens: an exact multiple of the block size
    return arrivals


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("small", [False, True], ids=["roomy", "preempting"])
def test_gpu_prefix_cache_equals_no_cache(quant, small, gpu_model_dir, gpu_adapters, hotlora_cache):
    # 32 sequence rows hold the workload's 17 requests; the small limits keep each engine at ~40 graphs instead of
    # ~100 (the GPU suite's slowest test, four times two engines, each capturing every bucket at startup)
    kw = dict(max_num_seqs=32, max_num_batched_tokens=128 if small else 256)
    if small:
        kw["num_kv_blocks"] = 40
    engines = _engines(gpu_model_dir, hotlora_cache, gpu_adapters, quant, **kw)
    got = {caching: drain(e, _workload(random.Random(7))) for caching, e in engines.items()}
    for rid, tokens in got[False].items():
        assert got[True][rid] == tokens, f"{rid}: caching changed the output"
    on = engines[True]
    assert on.blocks.hits > 0 and (on.scheduler.num_preemptions > 0 or not small)
    assert on.runner.graphs is None or on.runner.graphs.failed is None
    for e in engines.values():
        e.blocks.check_idle()
