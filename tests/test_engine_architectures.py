"""The engine's forward against transformers on each supported family: Llama (with Llama 3 rope scaling),
Qwen2 (q/k/v bias), Mistral (GQA 4:1, and a sliding window shorter than the prompts); random weights saved as
HF folders, fp32, greedy."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from engine_reference import save_random_model
from transformers import AutoModelForCausalLM

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams

N_TOKENS = 12
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


# presets with config overrides: same tensors, long-context rope scaling on / a 16-token sliding window
VARIANTS = {"tiny-llama3": ("tiny", {"rope_scaling": LLAMA3_ROPE}),
            "tiny-mistral-window": ("tiny-mistral", {"sliding_window": 16})}  # fmt: skip


def _model(preset: str, root: Path) -> Path:
    if preset not in VARIANTS:
        return save_random_model(preset, root / preset)
    base, overrides = VARIANTS[preset]
    folder = save_random_model(base, root / preset)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | overrides))
    return folder


@torch.inference_mode()
def _hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    for _ in range(N_TOKENS):
        tok = int(model(input_ids=ids).logits[0, -1].argmax())
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama3", "tiny-qwen2", "tiny-mistral", "tiny-mistral-window"])
def test_forward_matches_transformers(preset, tmp_path, hotlora_cache):
    _check_against_transformers(preset, tmp_path, hotlora_cache)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU: TRITON_INTERPRET=1")
def test_triton_attention_in_the_engine(tmp_path, hotlora_cache, monkeypatch):
    # the paged attention kernel (not the torch reference) serving the forward: GQA 4:1, chunked prompts
    # longer than the sliding window
    monkeypatch.setenv("HOTLORA_TRITON_CPU", "1")
    _check_against_transformers("tiny-mistral-window", tmp_path, hotlora_cache)


def _check_against_transformers(preset: str, tmp_path: Path, hotlora_cache: Path) -> None:
    folder = _model(preset, tmp_path)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (3, 40, 90)]  # 90 > 64: scaled rope region
    engine = LLMEngine(EngineConfig(model=str(folder), quant="none", cache_dir=hotlora_cache, max_loras=1,
                                    max_lora_rank=8, num_kv_blocks=64, block_size=8, max_num_batched_tokens=32))
    if preset == "tiny-mistral-window":
        assert engine.model_config.sliding_window == 16 and engine.max_model_len > 16  # no cap at the window
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
    outs = engine.generate([Request(f"p{i}", p, params) for i, p in enumerate(prompts)])
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.new_token_ids == _hf_greedy(hf, prompt)
    assert engine.blocks.num_used == 0
    shutil.rmtree(folder)
