"""Adapter mixes in the engine against PEFT's add_weighted_adapter(combination_type="cat"), token for token.

The default model (SmolLM2-135M) unquantized in float32 on the CPU; the four adapters of
engine_reference (ranks 8/16/4/12, different target-module sets, one rslora). Each mix shares one
batch with its own components and the base, and every request must equal its own reference.
"""

from __future__ import annotations

import pytest
from engine_reference import Reference, run_engine_mixed

N_TOKENS = 32
# two and three components, different ranks and target sets, a negative weight, overlapping targets
# (all16 and qv8 both target q/v). PEFT copies the first adapter's config into the mix (so an rslora
# first component would give the mix an rslora scale): no mix starts with the rslora adapter mlp4rs.
MIX2 = "qv8*0.7+ku12*0.5"
MIX2_NEG = "all16*0.6+qv8*-0.8"
MIX3 = "ku12*0.5+mlp4rs*1.2+qv8*-0.4"


@pytest.fixture(scope="module")
def reference(default_model_dir, adapters) -> Reference:
    ref = Reference(default_model_dir, adapters, "none")
    for mix in (MIX2, MIX2_NEG, MIX3):
        ref.add_mix(mix)
    return ref


def test_mixes_share_a_batch_with_their_components_and_match_peft(adapters, work, reference, hotlora_cache):
    prompt = work[0][0]
    models = [MIX2, "qv8", MIX3, None, MIX2_NEG, "ku12"]
    outs = run_engine_mixed(adapters, [(prompt, m) for m in models], N_TOKENS, quant="none",
                            cache_dir=hotlora_cache, max_loras=6, max_lora_rank=32)
    got = {m: out.new_token_ids for m, out in zip(models, outs, strict=True)}
    want = dict(zip(models, reference.greedy_batch(prompt, models, N_TOKENS), strict=True))
    for m in models:
        assert got[m] == want[m], f"{m}: engine {got[m]} != peft {want[m]}"
    # the mixes really differ from the base and from their components (else the equality proves little)
    assert len({tuple(t) for t in got.values()}) == len(models), got
