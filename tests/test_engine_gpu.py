"""The engine on CUDA (Triton LoRA kernels, bitsandbytes NF4 on the GPU) against transformers + peft on CUDA.

The GPU machine has no copy of the default model (its GGUF cannot travel there), so this runs the
SmolLM2-135M architecture with random weights, saved as an HF folder that both sides load.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from engine_reference import (
    ADAPTER_SPECS,
    BF16_LOGPROB,
    BF16_TIE,
    Reference,
    default_engine,
    drain,
    run_engine_mixed,
    teacher_forced_gaps,
)

from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams
from hotlora.server.model.graphs import graph_count

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

N_TOKENS = 32


@pytest.fixture(scope="module")
def gpu_work() -> list[tuple[list[int], str | None]]:
    rng = random.Random(0)
    names: list[str | None] = [*ADAPTER_SPECS, None, "qv8"]
    return [([rng.randrange(3, 49152) for _ in range(5 + 7 * i)], a) for i, a in enumerate(names)]


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_gpu_mixed_batch_tracks_peft(quant, gpu_adapters, gpu_work, gpu_model_dir, hotlora_cache):
    outs = run_engine_mixed(gpu_adapters, gpu_work, N_TOKENS, model=str(gpu_model_dir), quant=quant,
                            cache_dir=hotlora_cache, device="cuda", dtype="bfloat16")
    ref = Reference(gpu_model_dir, gpu_adapters, quant, device="cuda", dtype=torch.bfloat16)
    gaps = teacher_forced_gaps(ref, gpu_work, outs, N_TOKENS)
    print(f"quant={quant} (gap, logprob diff) per request: {gaps}")
    for (_, adapter), (gap, diff) in zip(gpu_work, gaps, strict=True):
        assert gap <= BF16_TIE, f"adapter {adapter}: a token {gap:.3f} nats below the reference's best"
        assert diff <= BF16_LOGPROB, f"adapter {adapter}: logprobs differ by {diff:.3f}"
    # the adapters change the output: the same prompt without its adapter scores the engine's tokens worse
    ids, adapter = gpu_work[0]
    assert not torch.equal(ref.score(ids, outs[0].new_token_ids, None), ref.score(ids, outs[0].new_token_ids, adapter))


def _nf4_engine(model_dir: Path, cache: Path, adapters: dict[str, Path], **kw) -> LLMEngine:
    """A bf16 engine on CUDA over the NF4 random model, with every GPU adapter registered (CUDA graphs on)."""
    return default_engine(cache, adapters, model=str(model_dir), quant="nf4", device="cuda", dtype="bfloat16",
                          kv_cache_memory=0.1, **kw)


def test_gpu_mixed_steps_replay_from_graphs(gpu_adapters, gpu_model_dir, hotlora_cache):
    # every bucket captured at startup; prompts arrive while others decode, chunked (64 tokens per step), so
    # steps mix prefill chunks with decodes: all of them replay from graphs, none runs eagerly
    engine = _nf4_engine(gpu_model_dir, hotlora_cache, gpu_adapters, max_num_seqs=8, max_num_batched_tokens=64)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.failed is None
    assert set(graphs.buckets) == set(graphs.keys()) and all(b.graph for b in graphs.buckets.values())
    steps: list[tuple[list[int], bool]] = []
    stage = graphs.stage

    def recording(step):
        bucket = stage(step)  # a staged bucket is replayed; None runs the step eagerly
        steps.append((list(step.q_lens), bucket is not None))
        return bucket

    graphs.stage = recording
    rng = random.Random(3)
    names = [*ADAPTER_SPECS, None, "qv8", None, "all16"]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    reqs = [Request(f"m{i}", [rng.randrange(3, 49152) for _ in range(10 + 23 * i)], params, a)
            for i, a in enumerate(names)]  # fmt: skip
    tokens = drain(engine, {2 * i: [r] for i, r in enumerate(reqs)})
    assert all(len(t) == params.max_tokens for t in tokens.values())
    mixed = [q for q, replayed in steps if replayed and 1 in q and max(q) > 1]
    assert mixed, steps  # a step mixing prefill chunks and decodes replayed from a graph
    assert engine.eager_steps == 0 and engine.stats().num_graph_steps == len(steps)
    assert all(replayed for _, replayed in steps)
    # the step timer saw every step; on CUDA the sync on the sampled ids is where the GPU time shows
    assert all(h.count == len(steps) for h in engine.timer.phases.values())
    assert engine.timer.phases["device_wait"].total > 0 and engine.timer.phases["launch"].total > 0
    assert engine.blocks.num_used == 0


def test_gpu_r16_decode_replays_rank_class_16(gpu_adapters, gpu_model_dir, hotlora_cache):
    # max_lora_rank 64 but every adapter r <= 16: decode steps replay graphs whose LoRA tiles are 16 rank rows
    # (rank class 16), not 64, steps with prefill chunks too (graphs.step_rank_class)
    engine = _nf4_engine(gpu_model_dir, hotlora_cache, gpu_adapters, max_lora_rank=64, max_num_seqs=4,
                         max_num_batched_tokens=16)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.failed is None and engine.runner.rank_classes == (16, 32, 64)
    assert len(graphs.buckets) == graph_count(4, 16, 3) and all(b.graph for b in graphs.buckets.values())
    rng = random.Random(5)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    reqs = [Request(f"k{i}", [rng.randrange(3, 49152) for _ in range(6 + 3 * i)], params, a)
            for i, a in enumerate(["all16", "qv8", "ku12", "mlp4rs"])]  # fmt: skip
    tokens = drain(engine, {0: reqs})
    assert all(len(t) == params.max_tokens for t in tokens.values())
    used = {key for key, n in graphs.replays.items() if n}
    assert {c for _, _, c in used} == {16} and {d for _, d, _ in used} == {True, False}, used  # never 64 rows
    assert all(graphs.buckets[k].batch.lora.rank_class == 16 for k in used)  # what the kernels read
    assert engine.eager_steps == 0 and engine.blocks.num_used == 0


def test_gpu_fp8_kv_cache(gpu_adapters, gpu_model_dir, hotlora_cache):
    """--kv-cache-dtype fp8 on CUDA: steps mixing prefill chunks and decodes replay from graphs; the prompt's
    logprobs (scored eagerly, every position reading the cache) stay close to the bf16 cache's and differ from
    them; no block leaks. (The block count per byte: tests/test_kv_cache_fp8.py.)"""
    rng = random.Random(9)
    prompt = [rng.randrange(3, 49152) for _ in range(150)]
    scored = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    runs = {}
    for kv in ("auto", "fp8"):
        engine = _nf4_engine(gpu_model_dir, hotlora_cache, gpu_adapters, max_num_seqs=8, max_num_batched_tokens=64,
                             num_kv_blocks=512, kv_cache_dtype=kv)
        assert engine.runner.model.layers[0].k_cache.dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16)
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        reqs = [Request(f"f{i}", [rng.randrange(3, 49152) for _ in range(10 + 30 * i)], params, a)
                for i, a in enumerate([*ADAPTER_SPECS, None])]  # fmt: skip
        tokens = drain(engine, {2 * i: [r] for i, r in enumerate(reqs)})
        assert all(len(t) == params.max_tokens for t in tokens.values())
        assert engine.eager_steps == 0 and engine.blocks.num_used == 0
        runs[kv] = engine.generate([Request("s", prompt, scored, "all16")])[0].prompt_logprobs[1:]
        assert engine.blocks.num_used == 0
    diffs = [abs(a.logprob - b.logprob) for a, b in zip(runs["auto"], runs["fp8"], strict=True)]
    assert max(diffs) > 0 and sum(diffs) / len(diffs) < 0.15
