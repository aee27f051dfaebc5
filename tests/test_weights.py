"""Model loading: ModelConfig validation, the converted default GGUF, HF folders, random presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hotlora.server.model import convert
from hotlora.server.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from hotlora.server.model.presets import PRESETS, preset_hf_config
from hotlora.server.model.weights import (
    Checkpoint,
    default_gguf_path,
    expected_shapes,
    load_hf_folder,
    resolve_checkpoint,
)

TINY_PRESETS = [p for p in PRESETS if p.startswith("tiny")]
LARGE_PRESETS = [p for p in PRESETS if not p.startswith("tiny")]

LLAMA31_8B_CONFIG = {  # config.json of meta-llama/Llama-3.1-8B-Instruct (transformers 4 layout)
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def save_hf_folder(ckpt: Checkpoint, hf_config: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(ckpt.tensors("cpu", torch.float32)), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config))
    return folder


# ---- ModelConfig -------------------------------------------------------------------------------------


def test_config_llama31_transformers4_layout():
    cfg = ModelConfig.from_hf_config(LLAMA31_8B_CONFIG, "llama31")
    assert (cfg.architecture, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        "llama",
        4096,
        32,
        32,
        8,
    )
    assert cfg.head_dim == 128 and cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.eos_token_ids == [128001, 128008, 128009] and cfg.bos_token_id == 128000
    assert not cfg.attention_bias and cfg.sliding_window is None and not cfg.tie_word_embeddings
    assert cfg.linear_shapes() == {
        "q_proj": (4096, 4096),
        "k_proj": (1024, 4096),
        "v_proj": (1024, 4096),
        "o_proj": (4096, 4096),
        "gate_proj": (14336, 4096),
        "up_proj": (14336, 4096),
        "down_proj": (4096, 14336),
    }


def test_config_transformers5_rope_parameters_and_generation_eos():
    raw = {k: v for k, v in LLAMA31_8B_CONFIG.items() if k not in ("rope_theta", "rope_scaling")}
    raw["eos_token_id"] = 128001
    raw["rope_parameters"] = {"rope_theta": 500000.0, **LLAMA31_8B_CONFIG["rope_scaling"]}
    cfg = ModelConfig.from_hf_config(raw, "v5", generation_config={"eos_token_id": [128001, 128009]})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 8.0
    assert cfg.eos_token_ids == [128001, 128009]
    plain = dict(raw, rope_parameters={"rope_theta": 1e4, "rope_type": "default"})
    assert ModelConfig.from_hf_config(plain, "v5").rope_scaling is None


def test_config_qwen2_bias_and_sliding_window_only_when_used():
    raw = dict(
        LLAMA31_8B_CONFIG,
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        sliding_window=131072,
        use_sliding_window=False,
        rope_scaling=None,
    )
    cfg = ModelConfig.from_hf_config(raw, "qwen")
    assert cfg.attention_bias and cfg.sliding_window is None
    mistral = dict(raw, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096)
    assert ModelConfig.from_hf_config(mistral, "m").sliding_window == 4096


@pytest.mark.parametrize(
    "raw",
    [
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
        {"model_type": "phi3"},
        dict(LLAMA31_8B_CONFIG, architectures=["MixtralForCausalLM"]),
    ],
)
def test_config_unsupported_architecture_names_supported_ones(raw):
    with pytest.raises(UnsupportedModelError) as err:
        ModelConfig.from_hf_config(raw, "x")
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize(
    "change",
    [
        {"hidden_act": "gelu"},
        {"mlp_bias": True},
        {"attention_bias": True},
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    ],
)
def test_config_unsupported_features(change):
    with pytest.raises(UnsupportedModelError):
        ModelConfig.from_hf_config(dict(LLAMA31_8B_CONFIG, **change), "x")


def test_config_inconsistent_heads():
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig.from_hf_config(dict(LLAMA31_8B_CONFIG, num_key_value_heads=5), "x")


# ---- the default model (SmolLM2-135M-Instruct GGUF, converted once per session) ---------------------


def test_default_config(default_checkpoint):
    cfg = default_checkpoint.config
    assert cfg.architecture == "llama" and cfg.name.startswith("SmolLM2-135M-Instruct")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (576, 1536, 30)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and not cfg.attention_bias
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == [2]


def test_default_tokenizer_has_chat_template(default_checkpoint):
    from transformers import AutoTokenizer

    folder = default_checkpoint.tokenizer_dir
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    text = tok.decode(ids)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert tok.convert_ids_to_tokens(default_checkpoint.config.eos_token_ids) == ["<|im_end|>"]


def test_default_tensors_stream_in_order(default_checkpoint):
    shapes = default_checkpoint.tensor_shapes()
    assert "lm_head.weight" not in shapes  # tied
    got = [(name, tuple(t.shape), t.dtype) for name, t in default_checkpoint.tensors("cpu", torch.bfloat16)]
    assert got == [(name, shape, torch.bfloat16) for name, shape in shapes.items()]
    assert len(got) == 1 + 30 * 9 + 1


def test_second_resolve_reuses_the_cache(default_checkpoint, hotlora_cache, monkeypatch):
    from hotlora.server.model import convert

    def no_conversion(*args):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(convert, "_convert_into", no_conversion)
    again = resolve_checkpoint("default", hotlora_cache, progress=False)
    assert again.path == default_checkpoint.path and again.config == default_checkpoint.config
    assert resolve_checkpoint(str(default_gguf_path()), hotlora_cache, progress=False).path == again.path


def test_converted_default_equals_transformers_gguf_load(default_checkpoint):
    """The folder holds exactly what transformers dequantizes from the GGUF (what from_pretrained(...,
    gguf_file=...) loads): every tensor equal, the same config, and transformers loads the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_config = AutoConfig.from_pretrained(default_checkpoint.path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    ref = load_gguf_checkpoint(str(default_gguf_path()), return_tensors=True, model_to_load=skeleton)
    ref_tensors = ref["tensors"]
    ours = dict(default_checkpoint.tensors("cpu", torch.float32))
    assert set(ref_tensors) == set(ours)  # lm_head is tied: neither has it
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref_tensors[name].float()), name
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(hf_config, key) == ref["config"][key], key
    model = AutoModelForCausalLM.from_pretrained(default_checkpoint.path).eval()
    assert model.dtype == torch.float32
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, ours["model.layers.3.mlp.down_proj.weight"])


# ---- HF folders ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_hf_folder_roundtrip_is_what_transformers_loads(preset, tmp_path, hotlora_cache):
    """Our names/shapes are transformers' own: it loads the folder with nothing missing or unexpected."""
    from transformers import AutoModelForCausalLM

    ckpt = resolve_checkpoint(f"random:{preset}", hotlora_cache, progress=False)
    folder = save_hf_folder(ckpt, preset_hf_config(preset), tmp_path / preset)
    loaded = load_hf_folder(folder)
    assert loaded.config.architecture == ckpt.config.architecture and loaded.tokenizer_dir is None
    for (name, a), (name_b, b) in zip(
        ckpt.tensors("cpu", torch.float32), loaded.tensors("cpu", torch.float32), strict=True
    ):
        assert name == name_b and torch.equal(a, b)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    for name, t in ckpt.tensors("cpu", torch.float32):
        assert torch.equal(state[name], t), name


def test_hf_folder_with_only_pickles_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset_hf_config("tiny")))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors only"):
        resolve_checkpoint(str(tmp_path))


def test_hf_folder_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        resolve_checkpoint(str(tmp_path))


def test_hf_folder_weights_not_matching_config(tmp_path, hotlora_cache):
    ckpt = resolve_checkpoint("random:tiny", hotlora_cache, progress=False)
    folder = save_hf_folder(ckpt, preset_hf_config("tiny"), tmp_path)
    (folder / "config.json").write_text(json.dumps(dict(preset_hf_config("tiny"), num_hidden_layers=3)))
    with pytest.raises(ValueError, match="missing"):
        list(load_hf_folder(folder).tensors("cpu", torch.float32))
    (folder / "config.json").write_text(json.dumps(dict(preset_hf_config("tiny"), intermediate_size=96)))
    with pytest.raises(ValueError, match="shape"):
        list(load_hf_folder(folder).tensors("cpu", torch.float32))


def test_missing_model_path():
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint("/nonexistent/model")


# ---- random presets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_random_tiny_presets_are_deterministic(preset, hotlora_cache, default_checkpoint):
    ckpt = resolve_checkpoint(f"random:{preset}", hotlora_cache, progress=False)
    assert ckpt.config.name == f"random:{preset}" and ckpt.path is None and ckpt.is_random
    assert ckpt.tokenizer_dir == default_checkpoint.tokenizer_dir  # the default model's tokenizer
    first = dict(ckpt.tensors("cpu", torch.float32))
    assert {n: tuple(t.shape) for n, t in first.items()} == ckpt.tensor_shapes()
    again = dict(ckpt.tensors("cpu", torch.bfloat16))
    assert all(torch.equal(first[n].to(torch.bfloat16), t) for n, t in again.items())
    other_seed = resolve_checkpoint(f"random:{preset}:1", hotlora_cache, progress=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(first[name], dict(other_seed.tensors("cpu", torch.float32))[name])
    assert ckpt.config.vocab_size >= 49152


def test_random_tiny_qwen2_has_qkv_bias(hotlora_cache):
    shapes = resolve_checkpoint("random:tiny-qwen2", hotlora_cache, progress=False).tensor_shapes()
    assert shapes["model.layers.1.self_attn.k_proj.bias"] == (32,)
    assert "model.layers.1.self_attn.o_proj.bias" not in shapes and "lm_head.weight" not in shapes


@pytest.mark.parametrize("preset", LARGE_PRESETS)
def test_random_large_presets_dry_run_matches_transformers(preset, hotlora_cache):
    """Shapes only (device meta): transformers' model of the same config has the same parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = resolve_checkpoint(f"random:{preset}", hotlora_cache, progress=False)
    ours = {n: tuple(t.shape) for n, t in ckpt.tensors("meta", torch.bfloat16)}
    hf_cfg = preset_hf_config(preset)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_cfg))
    assert ours == {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_random_llama3_8b_config():
    from hotlora.server.model.presets import preset_config

    cfg = preset_config("llama-3-8b")
    assert cfg.name == "random:llama-3-8b"
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (4096, 32, 32, 8)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta) == (14336, 128256, 500000.0)
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
    params = sum(torch.Size(s).numel() for s in expected_shapes(cfg).values())
    assert 8.0e9 < params < 8.1e9


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny"):
        resolve_checkpoint("random:nope")


# ---- the conversion is atomic ------------------------------------------------------------------------------


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{half")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "_write_config", interrupted)
    stale = tmp_path / ".tmp-999999999-SmolLM2-dead"  # left by a killed run: no such pid
    stale.mkdir()
    with pytest.raises(KeyboardInterrupt):
        resolve_checkpoint("default", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
