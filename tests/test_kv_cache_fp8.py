"""The fp8 KV cache (EngineConfig.kv_cache_dtype / --kv-cache-dtype fp8) through the engine on the CPU: K and V
stored as float8_e4m3fn (kernels: tests/test_elementwise_kernels.py, tests/test_attention_kernel.py)."""

from __future__ import annotations

import os
import random

import pytest
import torch
from engine_reference import default_engine

from hotlora.kernels.reference import FP8_KV
from hotlora.server.api.metrics import Metrics
from hotlora.server.cli import build_parser, engine_config
from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.types import Request, SamplingParams


def test_the_option_reaches_the_engine_config():
    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8"])
    assert engine_config(args).kv_cache_dtype == "fp8"
    assert engine_config(build_parser().parse_args(["serve"])).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-dtype", "int8"])
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp16")


def test_fp8_cache_holds_4x_the_blocks_and_scores_prompts_close_to_fp32(hotlora_cache):
    """Same memory budget: 4x the blocks of an fp32 cache. On a plain-English prompt (~60 tokens, 4 blocks) the
    prompt's logprobs (every position reads K/V from the cache) stay close to the fp32 cache's and differ (the
    cache really is fp8; 3 mantissa bits); the greedy continuation starts the same; every block is free
    afterwards; /metrics names the cache's type as vLLM does. (A repeated run of random token ids, where copying
    heads attend sharply, moved them more: 0.26 nats on average.)"""
    text = ("The river rises in the mountains to the north and flows south through a wide valley of farms and small "
            "towns. In spring the snow melts and the water runs high; by late summer it is slow and warm. The largest "
            "town on its banks is known for a stone bridge built four hundred years ago")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    runs = {}
    for kv in ("auto", "fp8"):
        engine = default_engine(hotlora_cache, {}, kv_cache_dtype=kv)
        ids = engine.tokenizer.encode(text)
        cache = engine.runner.model.layers[0].k_cache
        assert cache.dtype == (FP8_KV if kv == "fp8" else torch.float32)
        out = engine.generate([Request(kv, ids, params, None)])[0]
        assert engine.blocks.num_used == 0
        labels = f'block_size="16",cache_dtype="{kv}",num_gpu_blocks="{engine.runner.num_kv_blocks}"'
        assert f"vllm:cache_config_info{{{labels}}} 1.0" in Metrics().render(engine.stats(), [], True).decode()
        runs[kv] = (engine.runner.num_kv_blocks, out)
    (blocks32, ref), (blocks8, got) = runs["auto"], runs["fp8"]
    assert 3.9 <= blocks8 / blocks32 <= 4.1
    diffs = [abs(a.logprob - b.logprob) for a, b in zip(ref.prompt_logprobs[1:], got.prompt_logprobs[1:], strict=True)]
    assert max(diffs) > 0 and sum(diffs) / len(diffs) < 0.15 and max(diffs) < 1.0
    assert got.new_token_ids[0] == ref.new_token_ids[0]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU: TRITON_INTERPRET=1")
def test_triton_kernels_write_and_read_the_fp8_cache_as_the_reference(hotlora_cache, monkeypatch):
    """The same fp8-cache engine with the Triton kernels (rope + KV write, paged attention; the interpreter) and
    with their torch references: the first layer's K/V bytes are equal (its inputs are), and the prompt's
    logprobs agree to attention's rounding."""
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    prompt = [random.Random(3).randrange(3, 1000) for _ in range(40)]
    runs = {}
    for triton in ("1", "0"):
        monkeypatch.setenv("HOTLORA_TRITON_CPU", triton)
        engine = default_engine(hotlora_cache, {}, model="random:tiny", kv_cache_dtype="fp8", num_kv_blocks=16,
                                block_size=8, max_num_batched_tokens=16)  # prompt chunks of 16 tokens
        out = engine.generate([Request("p", prompt, params, None)])[0]
        layer = engine.runner.model.layers[0]
        runs[triton] = out, layer.k_cache.float(), layer.v_cache.float()
    (got, k1, v1), (want, k0, v0) = runs["1"], runs["0"]
    assert k1.abs().sum() > 0 and torch.equal(k1, k0) and torch.equal(v1, v0)
    diffs = [abs(a.logprob - b.logprob) for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True)]
    assert max(diffs) < 1e-3
