"""The engine against transformers + peft: one mixed batch, each request generated alone by the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_reference import ADAPTER_SPECS, Reference, save_adapters

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams

N_TOKENS = 32
# NF4 on CPU: bitsandbytes computes the 4-bit matmul in bf16 (its AVX512-BF16 path, which our NF4 layer
# reproduces bit for bit), so activations carry ~2^-8 relative noise and a near-tie between two tokens can
# break either way; after that the continuations differ legitimately. So for NF4 every token the engine
# picks must be the reference's argmax up to NF4_TIE nats, scored by the reference on the engine's own
# continuation, and the engine's log-probability of it must agree with the reference's within NF4_LOGPROB.
NF4_TIE = 0.15
NF4_LOGPROB = 0.15
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


def _engine_greedy(engine: LLMEngine, work: list[tuple[list[int], str | None]]):
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
    reqs = [Request(f"r{i}", ids, params, adapter) for i, (ids, adapter) in enumerate(work)]
    outs = engine.generate(reqs)
    assert all(o.finish_reason.value == "length" for o in outs)
    return outs


@pytest.fixture(scope="module")
def work(default_model_dir) -> list[tuple[list[int], str | None]]:
    from transformers import AutoTokenizer

    return _mixed_requests(AutoTokenizer.from_pretrained(str(default_model_dir), local_files_only=True))


def _run(quant: str, adapters, work, hotlora_cache):
    engine = LLMEngine(EngineConfig(model="default", quant=quant, cache_dir=hotlora_cache, max_loras=4,
                                    max_lora_rank=16, kv_cache_memory=0.25))
    for name, path in adapters.items():
        engine.registry.register(name, path)
    outs = _engine_greedy(engine, work)
    assert engine.blocks.num_used == 0
    assert engine.stats().num_running == 0
    return outs


def test_mixed_adapter_batch_matches_peft_exactly(adapters, work, default_model_dir, hotlora_cache):
    outs = _run("none", adapters, work, hotlora_cache)
    ref = Reference(default_model_dir, adapters, "none")
    for (ids, adapter), out in zip(work, outs, strict=True):
        want = ref.greedy(ids, adapter, N_TOKENS)
        assert out.new_token_ids == want, f"adapter {adapter}: engine {out.new_token_ids} != peft {want}"
    # the adapters really change the output (otherwise the comparison above proves little)
    assert outs[0].new_token_ids != ref.greedy(work[0][0], None, N_TOKENS)


def test_mixed_adapter_batch_on_nf4_matches_qlora_reference(adapters, work, default_model_dir, hotlora_cache):
    outs = _run("nf4", adapters, work, hotlora_cache)
    ref = Reference(default_model_dir, adapters, "nf4")
    for (ids, adapter), out in zip(work, outs, strict=True):
        lp = ref.score(ids, out.new_token_ids, adapter)
        chosen = lp[torch.arange(N_TOKENS), torch.tensor(out.new_token_ids)]
        gap = (lp.max(dim=-1).values - chosen).max().item()
        assert gap <= NF4_TIE, f"adapter {adapter}: a token {gap:.3f} nats below the reference's best"
        engine_lp = torch.tensor([t.logprob for t in out.logprobs])
        diff = (engine_lp - chosen).abs().max().item()
        assert diff <= NF4_LOGPROB, f"adapter {adapter}: logprobs differ by {diff:.3f}"
