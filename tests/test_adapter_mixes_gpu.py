"""Adapter mixes on CUDA (Triton LoRA kernels, bitsandbytes NF4 on the GPU) against PEFT's
add_weighted_adapter(combination_type="cat") on CUDA, within the tolerances test_engine_gpu holds the
engine to (bf16 end to end). As there, the SmolLM2-135M architecture with random weights stands in for
the default model, which the GPU machine has no copy of."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from engine_reference import (
    BF16_LOGPROB,
    BF16_TIE,
    MIX2,
    MIX2_NEG,
    MIX3,
    Reference,
    run_engine_mixed,
    teacher_forced_gaps,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

N_TOKENS = 32


def check_mixes_track_peft(model_dir: Path, adapters: dict[str, Path], quant: str, device: str,
                           dtype: torch.dtype, tie: float, logprob: float, **engine) -> None:
    """Three mixes in one batch with two of their components and the base: every request's tokens are
    the reference's best up to `tie` nats, and its log-probabilities within `logprob` of the reference's."""
    rng = random.Random(0)
    models = [MIX2, "qv8", MIX3, None, MIX2_NEG, "ku12"]
    work = [([rng.randrange(3, 49152) for _ in range(5 + 7 * i)], m) for i, m in enumerate(models)]
    outs = run_engine_mixed(adapters, work, N_TOKENS, model=str(model_dir), quant=quant, device=device,
                            dtype=str(dtype).removeprefix("torch."), max_loras=6, max_lora_rank=32, **engine)
    ref = Reference(model_dir, adapters, quant, device=device, dtype=dtype)
    for mix in (MIX2, MIX2_NEG, MIX3):
        ref.add_mix(mix)
    gaps = teacher_forced_gaps(ref, work, outs, N_TOKENS)
    for (_, model), (gap, diff) in zip(work, gaps, strict=True):
        assert gap <= tie, f"{model}: a token {gap:.3f} nats below the reference's best"
        assert diff <= logprob, f"{model}: logprobs differ by {diff:.3f}"
    # the mix changes the output: its components alone score the engine's tokens differently
    ids, tokens = work[0][0], outs[0].new_token_ids
    assert not torch.equal(ref.score(ids, tokens, MIX2), ref.score(ids, tokens, "qv8"))


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_gpu_mixes_track_peft(quant, gpu_adapters, gpu_model_dir, hotlora_cache):
    check_mixes_track_peft(gpu_model_dir, gpu_adapters, quant, "cuda", torch.bfloat16, BF16_TIE, BF16_LOGPROB,
                           cache_dir=hotlora_cache)
