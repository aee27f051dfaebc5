"""The engine on CUDA (Triton LoRA kernels, bitsandbytes NF4 on the GPU) against transformers + peft on CUDA."""

from __future__ import annotations

import pytest
import torch
from engine_reference import Reference, run_engine_mixed, teacher_forced_gaps

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

N_TOKENS = 32
# bf16 end to end on both sides (and NF4 dequantized to bf16): logits carry ~1e-2 relative noise, so a
# chosen token may trail the reference's best by a near-tie; 0.5 nats is far below a real disagreement.
BF16_TIE = 0.5


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_gpu_mixed_batch_tracks_peft(quant, adapters, work, default_model_dir, hotlora_cache):
    outs = run_engine_mixed(adapters, work, N_TOKENS, quant=quant, cache_dir=hotlora_cache, device="cuda",
                            dtype="bfloat16")
    ref = Reference(default_model_dir, adapters, quant, device="cuda", dtype=torch.bfloat16)
    gaps = teacher_forced_gaps(ref, work, outs, N_TOKENS)
    print(f"quant={quant} (gap, logprob diff) per request: {gaps}")
    for (_, adapter), (gap, diff) in zip(work, gaps, strict=True):
        assert gap <= BF16_TIE, f"adapter {adapter}: a token {gap:.3f} nats below the reference's best"
        assert diff <= BF16_TIE, f"adapter {adapter}: logprobs differ by {diff:.3f}"
