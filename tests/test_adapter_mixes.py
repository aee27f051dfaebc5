"""Adapter mixes in the engine against PEFT's add_weighted_adapter(combination_type="cat"), token for token.

The default model (SmolLM2-135M) unquantized in float32 on the CPU; the four adapters of
engine_reference (ranks 8/16/4/12, different target-module sets, one rslora). Each mix shares one
batch with its own components and the base, and every request must equal its own reference.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from engine_reference import MIX2, MIX2_NEG, MIX3, Reference, run_engine_mixed
from lora_factory import TINY_SHAPES

from hotlora.adapters.mixspec import MixError, parse_mix
from hotlora.adapters.peft_format import AdapterError, load_peft_adapter
from hotlora.adapters.registry import AdapterRegistry, UnknownAdapterError
from hotlora.kernels.lora import build_lora_meta, lora_apply

TINY_OUT = {m: out for m, (out, _) in TINY_SHAPES.items()}

N_TOKENS = 32


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


@pytest.mark.parametrize(("text", "parsed", "canonical"), [
    ("sql*0.7+chat*0.3", [("sql", 0.7), ("chat", 0.3)], "sql*0.7+chat*0.3"),
    (" sql + chat*-1e-1 ", [("sql", 1.0), ("chat", -0.1)], "sql*1.0+chat*-0.1"),
    ("a.b_c-d*+2", [("a.b_c-d", 2.0)], "a.b_c-d*2.0"),
])
def test_mix_spelling(text, parsed, canonical):
    spec = parse_mix(text)
    assert [(c.name, c.weight) for c in spec.components] == parsed and spec.canonical == canonical
    assert parse_mix(spec.canonical) == spec


@pytest.mark.parametrize("text", ["", "a+", "a*", "a*.+b", "a b", "a*1*2", "a/b+c", "a+b+a"])
def test_malformed_mixes(text):
    with pytest.raises(MixError):
        parse_mix(text)


# --- the mix's device slot, on tiny shapes: the kernels' delta is the weighted sum of the components' ---


@pytest.fixture
def tiny_registry(tmp_path):
    from lora_factory import save_adapter, tiny_llama

    from hotlora.adapters.cache import LoraSlotCache

    base = tiny_llama()
    cache = LoraSlotCache(TINY_SHAPES, 2, num_slots=4, pool_rows=32, device="cpu", dtype=torch.float32)
    registry = AdapterRegistry(cache, TINY_SHAPES, 2, max_rank=8, host_budget_bytes=1 << 30)
    specs = {
        "p": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"]),
        # rslora, only layer 1, and v_proj which "p" does not target: per-module ranks 6/4/2/2 in the mix
        "s": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    }
    for i, (name, spec) in enumerate(specs.items()):
        registry.register(name, save_adapter(base, tmp_path / name, seed=i + 1, **spec))
    yield registry
    registry.close()


def _acquire(registry, version) -> int:
    deadline = time.monotonic() + 30
    while (slot := registry.acquire(version)) is None:
        assert time.monotonic() < deadline, "the mix never reached the device"
        time.sleep(0.01)
    return slot


@pytest.mark.parametrize("triton", [False, True])
def test_mix_slot_applies_the_weighted_sum_of_its_components(triton, tiny_registry, monkeypatch):
    if triton and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on the CPU only under TRITON_INTERPRET=1")
    monkeypatch.setenv("HOTLORA_TRITON_CPU", "1" if triton else "0")
    registry, cache = tiny_registry, tiny_registry.cache
    mix = registry.resolve("p*0.5+s*-2")
    slot = _acquire(registry, mix)
    parts = [(load_peft_adapter(registry.current[n].path, n), w) for n, w in (("p", 0.5), ("s", -2.0))]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    meta = build_lora_meta(torch.full((5,), slot, dtype=torch.int32), cache.row_start, cache.scale, 8)
    for layer in range(2):
        for group in (("q_proj", "k_proj", "v_proj"), ("down_proj",)):
            width = 64 if group == ("down_proj",) else 32
            xs = torch.randn(5, width, generator=torch.Generator().manual_seed(layer)) if width == 64 else x
            ys = [torch.zeros(5, TINY_OUT[m]) for m in group]
            lora_apply(ys, xs, [cache.layers[layer][m] for m in group], meta)
            for m, y in zip(group, ys, strict=True):
                want = torch.zeros_like(y)
                for adapter, w in parts:
                    if (layer, m) in adapter.weights:
                        a, b = adapter.weights[(layer, m)]
                        want += w * adapter.config.scale * (xs @ a.T @ b.T)
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"layer {layer} {m}")
    registry.release(mix, slot)


def test_mix_table_limits_and_invalidation(tiny_registry):
    registry, cache = tiny_registry, tiny_registry.cache
    registry.mixes.max_rank = 5  # as if the server ran with --max-lora-rank 5: r4 + r2 is too much
    with pytest.raises(AdapterError, match="summed rank 6"):
        registry.resolve("p+s")
    registry.mixes.max_rank = 8
    with pytest.raises(UnknownAdapterError) as err:
        registry.resolve("p+nope")
    assert err.value.name == "nope"
    mix = registry.resolve("p*0.5+s")
    assert registry.resolve("p * 0.5 + s * 1") is mix  # cached under its canonical spelling
    slot = _acquire(registry, mix)
    registry.register("s", registry.current["s"].path)  # a hot swap of a component, while the mix runs
    new = registry.resolve("p*0.5+s")
    assert new is not mix and new.version > mix.version
    assert cache.lookup(mix) == slot  # the running sequence keeps its weights
    registry.release(mix, slot)
    assert cache.lookup(mix) is None  # and the slot goes with its last user
    _acquire(registry, new)
    registry.remove("p")
    with pytest.raises(UnknownAdapterError):
        registry.resolve("p*0.5+s")


def test_an_overflowing_mix_cannot_poison_other_sequences_through_stale_kv(adapters, hotlora_cache):
    """A mix with huge weights overflows its own activations (its output is garbage: its business) and writes
    inf/NaN into its KV blocks. Those blocks are freed and handed to other sequences; the CPU attention reads
    slots past a shorter decode's context under the mask (padding to the batch's longest context), and there
    0 x NaN is NaN: the base-model requests decoded side by side afterwards must still get their own tokens."""
    from hotlora.server.engine.config import EngineConfig
    from hotlora.server.engine.engine import LLMEngine
    from hotlora.server.engine.types import Request, SamplingParams

    engine = LLMEngine(EngineConfig(model="default", quant="none", cache_dir=hotlora_cache, max_loras=2,
                                    max_lora_rank=32, max_model_len=256, num_kv_blocks=16,
                                    enable_prefix_caching=False))
    for name in ("qv8", "all16"):
        engine.registry.register(name, adapters[name])
    tok = engine.tokenizer
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    overflow = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine.generate([Request("overflow", tok.encode("Hello there my friend"), overflow, adapter="qv8*3e38+all16*3e38")])
    prompts = [tok.encode(t) for t in ("The capital of France is", "Once upon a time, in a land far away, there was a")]
    together = engine.generate([Request(f"v{i}", p, greedy) for i, p in enumerate(prompts)])
    alone = [engine.generate([Request(f"alone{i}", p, greedy)])[0] for i, p in enumerate(prompts)]
    assert [o.new_token_ids for o in together] == [o.new_token_ids for o in alone]
    engine.blocks.check_idle()
