"""adapters/peft_format.py against adapters saved by peft itself: what loads, and every refusal."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from lora_factory import TINY_SHAPES, save_adapter, tiny_llama
from peft import IA3Config, get_peft_model
from safetensors.torch import load_file, save_file

from hotlora.adapters.peft_format import (
    TARGET_MODULES,
    AdapterError,
    check_compatible,
    load_peft_adapter,
    read_adapter_config,
)

LAYERS = 2


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture
def plain(base, tmp_path) -> Path:
    return save_adapter(base, tmp_path / "plain", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def load_ok(folder: Path, max_rank: int = 64):
    adapter = load_peft_adapter(folder, "a")
    check_compatible(adapter, TINY_SHAPES, LAYERS, max_rank)
    return adapter


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def edit_tensors(folder: Path, fn) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def refused(folder: Path, match: str, num_layers: int = LAYERS, max_rank: int = 64) -> None:
    with pytest.raises(AdapterError, match=match):
        adapter = load_peft_adapter(folder, "a")
        check_compatible(adapter, TINY_SHAPES, num_layers, max_rank)


def test_plain_adapter_loads_as_saved(base, plain):
    adapter = load_ok(plain)
    assert adapter.config.rank == 4 and adapter.config.alpha == 8.0 and adapter.config.scale == 2.0
    assert adapter.config.target_modules == {"q_proj", "v_proj"}
    assert set(adapter.weights) == {(i, m) for i in range(LAYERS) for m in ("q_proj", "v_proj")}
    a, b = adapter.weights[(1, "v_proj")]
    peft_a = base.model.layers[1].self_attn.v_proj.weight  # base untouched by the factory
    assert a.shape == (4, 32) and b.shape == (16, 4) and peft_a.shape == (16, 32)
    stored = load_file(str(plain / "adapter_model.safetensors"))
    assert torch.equal(a, stored["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"])
    assert adapter.sha256 == hashlib.sha256((plain / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert adapter.nbytes == sum(t.nbytes for t in stored.values())
    assert adapter.path == plain and adapter.name == "a"


def test_rslora_scale(base, tmp_path):
    adapter = load_ok(save_adapter(base, tmp_path / "rs", r=16, lora_alpha=8, use_rslora=True))
    assert math.isclose(adapter.config.scale, 8 / 4)


def test_all_linear_and_qlora_style_config(base, tmp_path):
    folder = save_adapter(
        base,
        tmp_path / "q",
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules="all-linear",
    )
    edit_config(folder, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    adapter = load_ok(folder)
    assert adapter.config.target_modules == set(TARGET_MODULES)
    assert len(adapter.weights) == LAYERS * len(TARGET_MODULES)
    assert adapter.config.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    edit_config(folder, target_modules="all-linear")  # hand-written form
    assert read_adapter_config(folder).target_modules == set(TARGET_MODULES)


def test_regex_target_modules_match_full_names(base, tmp_path):
    folder = save_adapter(base, tmp_path / "re", target_modules=r".*\.layers\.1\..*(k_proj|down_proj)")
    adapter = load_ok(folder)
    assert set(adapter.weights) == {(1, "k_proj"), (1, "down_proj")}
    assert adapter.config.target_modules == {"k_proj", "down_proj"}


def test_layers_to_transform_is_mapped(base, tmp_path):
    folder = save_adapter(
        base,
        tmp_path / "lt",
        target_modules=["o_proj", "up_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
    )
    adapter = load_ok(folder)
    assert set(adapter.weights) == {(1, "o_proj"), (1, "up_proj")}


def test_adapter_name_segment_in_keys_is_accepted(plain):
    def rename(t):
        for k in list(t):
            t[k.replace(".weight", ".default.weight")] = t.pop(k)

    edit_tensors(plain, rename)
    assert len(load_ok(plain).weights) == 4


def test_exclude_modules(base, tmp_path):
    folder = save_adapter(
        base, tmp_path / "ex", target_modules=["q_proj"], exclude_modules=["layers.0.self_attn.q_proj"]
    )
    assert set(load_ok(folder).weights) == {(1, "q_proj")}


@pytest.mark.parametrize(
    "lora, match",
    [
        (dict(use_dora=True), "DoRA"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(target_modules=["q_proj", "embed_tokens"]), "embed_tokens"),
        (dict(target_modules=["q_proj", "lm_head"]), "lm_head"),
        (dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
        (dict(alpha_pattern={"q_proj": 2}), "alpha_pattern"),
        (dict(lora_bias=True), "lora_bias"),
    ],
)
def test_unsupported_peft_features_are_refused(base, tmp_path, lora, match):
    refused(save_adapter(base, tmp_path / "bad", **lora), match)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(bias="all"), "bias must be 'none'"),
        (dict(peft_type="LOHA"), "peft_type"),
        (dict(target_modules=".*lm_head"), "lm_head"),
        (dict(target_modules="(unclosed"), "does not compile"),
        (dict(target_modules=["c_attn"]), "c_attn"),
        (dict(r=8), "rank 4 does not match r=8"),
        (dict(r=0), "positive integer"),
        (dict(lora_alpha="x"), "lora_alpha"),
        (dict(lora_alpha=1e39), "float32's range"),
        (dict(lora_alpha=3e38, r=4, use_rslora=False), None),  # finite scale 7.5e37: loads
        (dict(lora_alpha=-1e308), "float32's range"),
        (dict(init_lora_weights="pissa"), "modifies the base"),
        (dict(task_type="SEQ_CLS"), "task_type"),
        (dict(layers_to_transform="all"), "layers_to_transform"),
    ],
)
def test_bad_config_fields_are_refused(plain, changes, match):
    edit_config(plain, **changes)
    if match is None:
        load_ok(plain)
    else:
        refused(plain, match)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"peft_type": "LORA", "r": 4, "lora_alpha": 1' + "0" * 400 + "}", "float32's range"),  # OverflowError
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # RecursionError in the parser
    ],
)
def test_hostile_config_text_is_refused(plain, text, match):
    (plain / "adapter_config.json").write_text(text)
    refused(plain, match)


def test_other_peft_type_saved_by_peft_is_refused(base, tmp_path):
    model = get_peft_model(base, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model.save_pretrained(str(tmp_path / "ia3"))
    model.unload()
    refused(tmp_path / "ia3", "peft_type must be 'LORA'")


def test_pickled_weights_are_refused(base, tmp_path):
    model = get_peft_model(base, __import__("peft").LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path / "pk"), safe_serialization=False)
    model.unload()
    assert (tmp_path / "pk" / "adapter_model.bin").exists()
    refused(tmp_path / "pk", "pickled weights are never loaded")


def test_missing_files_and_garbage_are_refused(plain, tmp_path):
    (plain / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    refused(plain, "not a valid safetensors")
    (plain / "adapter_model.safetensors").unlink()
    refused(plain, "adapter_model.safetensors is missing")
    (plain / "adapter_config.json").write_text("{not json")
    refused(plain, "not valid JSON")
    (plain / "adapter_config.json").write_text("[1, 2]")
    refused(plain, "JSON object")
    refused(tmp_path / "nowhere", "adapter_config.json is missing")


def test_unaligned_tensors_are_refused_as_a_cold_load_refuses_them(plain):
    """A valid safetensors file whose header is not padded: the library reads it, but a cold load views tensors in
    place and refuses it (adapters/staging.py), so the upload is refused too rather than served until then."""
    from hotlora.adapters.staging import parse_staged, read_raw

    weights = plain / "adapter_model.safetensors"
    tensors = load_file(weights)
    header, data = {}, b""
    for k in sorted(tensors):
        raw = tensors[k].contiguous().numpy().tobytes()
        assert tensors[k].dtype == torch.float32
        header[k] = {"dtype": "F32", "shape": list(tensors[k].shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * ((1 - 8 - len(text)) % 4)  # the data starts 1 byte past a multiple of 4
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data)
    with pytest.raises(AdapterError, match="not aligned"):
        parse_staged(read_raw(plain, pin=False), plain, "a")
    refused(plain, "not aligned")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (
            lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 128)}),
            "unexpected tensor",
        ),
        (
            lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)}),
            "unexpected tensor",
        ),
        (
            lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(32)}),
            "unexpected tensor",
        ),
        (
            lambda t: t.update({"base_model.model.model.layers.0.mlp.q_proj.lora_A.weight": torch.zeros(4, 32)}),
            "unexpected tensor",
        ),
        (lambda t: t.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"), "no lora_B"),
        (
            lambda t: t["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].__setitem__((0, 0), math.nan),
            "NaN or infinite",
        ),
        (
            lambda t: t["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].__setitem__((1, 1), math.inf),
            "NaN or infinite",
        ),
        (
            lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(3, 32)}),
            "rank 3 does not match r=4",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(
                        4, 32, dtype=torch.int32
                    )
                }
            ),
            "floating point",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 32),
                    "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(16, 4),
                }
            ),
            "do not select",
        ),
        (lambda t: [t.pop(k) for k in list(t) if ".layers.1.self_attn.v_proj" in k], "has no LoRA weights"),
        (lambda t: t.clear(), "holds no LoRA weights"),
        (lambda t: t.update({k: v.to(torch.float8_e4m3fn) for k, v in t.items()}), "floating point"),
    ],
)
def test_bad_tensors_are_refused(plain, mutate, match):
    edit_tensors(plain, mutate)
    refused(plain, match)


def test_rank_above_max_is_refused(plain):
    refused(plain, "above the server's maximum LoRA rank 2", max_rank=2)


def test_layer_beyond_base_is_refused(plain):
    refused(plain, "base model has 1 layers", num_layers=1)


def test_shapes_of_another_base_are_refused(tmp_path):
    other = tiny_llama()
    other.model.layers[0].self_attn.v_proj = torch.nn.Linear(32, 24, bias=False)
    other.model.layers[1].self_attn.v_proj = torch.nn.Linear(32, 24, bias=False)
    refused(save_adapter(other, tmp_path / "other"), r"v_proj: lora_A \(4, 32\) / lora_B \(24, 4\) do not fit")


def test_pinned_blocks_are_the_allocator_power_of_two_sizes_within_the_budget():
    from hotlora.adapters.staging import pinned_blocks

    mib = 1 << 20
    sizes = [84 * mib, 11 * mib, 11 * mib, 16 * mib, 0]
    assert pinned_blocks(sizes, 1 << 30) == [16 * mib, 16 * mib, 16 * mib, 128 * mib]
    assert pinned_blocks(sizes, 60 * mib) == [16 * mib, 16 * mib, 16 * mib]  # the 128 MiB block does not fit
    assert pinned_blocks([1, 4096, 4097], 1 << 20) == [1, 4096, 8192]


def test_parse_loops_offer_the_gil(monkeypatch):
    """adapters.gilyield.yielding: every item, in order, with a sleep(0) before every `every`-th after the
    first (what lets the engine thread in during a reading thread's parse)."""
    from hotlora.adapters import gilyield

    sleeps = []
    monkeypatch.setattr(gilyield.time, "sleep", sleeps.append)
    assert list(gilyield.yielding(range(100), every=7)) == list(range(100))
    assert sleeps == [0] * 14
    assert list(gilyield.yielding([], every=7)) == [] and len(sleeps) == 14
