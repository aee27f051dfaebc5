"""`hotlora merge` against PEFT's merge_and_unload (one adapter, and an add_weighted_adapter "cat" mix):
the exported folder loads with transformers, holds PEFT's merged weights bit for bit, generates the
same greedy tokens, and `hotlora serve --model DIR` serves those tokens through HTTP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from engine_reference import greedy_loop, load_base
from peft import PeftModel
from server_harness import ServerThread, server_settings
from transformers import AutoModelForCausalLM, AutoTokenizer

from hotlora.server.cli import main
from hotlora.server.model import merge as merge_module

N_TOKENS = 32
MIX = "ku12*0.5+qv8*-0.7"


@pytest.fixture(scope="module")
def store(adapters, tmp_path_factory) -> Path:
    """An adapter store (one folder per name), as `hotlora serve --adapter-dir` keeps it."""
    root = tmp_path_factory.mktemp("merge-store")
    for name in ("qv8", "ku12"):
        shutil.copytree(adapters[name], root / name)
    return root


@pytest.fixture(scope="module")
def prompt(work) -> list[int]:
    return work[0][0]


def merge(*args: str) -> int:
    return main(["merge", "--model", "default", "--no-progress", *args])


def assert_same_weights(folder: Path, ref: torch.nn.Module) -> torch.nn.Module:
    """The exported folder loads with transformers and holds exactly `ref`'s weights; the loaded model."""
    got = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval()
    want = ref.state_dict()
    for name, t in got.state_dict().items():
        assert torch.equal(t, want[name]), name
    return got


def test_merge_one_adapter_equals_peft_merge_and_unload(adapters, default_model_dir, prompt, tmp_path,
                                                         monkeypatch):
    monkeypatch.setattr(merge_module, "MAX_SHARD_BYTES", 200 << 20)  # ~540 MB of float32: three shards
    out = tmp_path / "merged"
    assert merge("--adapter", str(adapters["all16"]), "--out", str(out)) == 0
    files = {p.name for p in out.iterdir()}
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "generation_config.json", *shards} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"
    ref = PeftModel.from_pretrained(load_base(default_model_dir, "none"), str(adapters["all16"])).merge_and_unload()
    got = assert_same_weights(out, ref)
    assert greedy_loop(got, prompt, N_TOKENS) == greedy_loop(ref.eval(), prompt, N_TOKENS)


def test_merge_a_mix_equals_peft_cat_and_serves_the_same_tokens(adapters, default_model_dir, store, prompt,
                                                                 tmp_path, hotlora_cache):
    out = tmp_path / "merged-mix"
    out.mkdir()
    (out / "stale.txt").write_text("replaced by --force")
    assert merge("--adapter", MIX, "--adapter-dir", str(store), "--out", str(out), "--dtype", "float32",
                 "--force") == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    peft = PeftModel.from_pretrained(load_base(default_model_dir, "none"), str(adapters["ku12"]), adapter_name="ku12")
    peft.load_adapter(str(adapters["qv8"]), adapter_name="qv8")
    peft.add_weighted_adapter(["ku12", "qv8"], [0.5, -0.7], "mix", combination_type="cat")
    peft.set_adapter("mix")
    ref = peft.merge_and_unload().eval()
    got = assert_same_weights(out, ref)
    want = greedy_loop(ref, prompt, N_TOKENS)
    assert greedy_loop(got, prompt, N_TOKENS) == want
    del got, ref, peft
    server = ServerThread(server_settings(tmp_path / "no-adapters", hotlora_cache, model=str(out))).start()
    try:
        body = {"model": server.state.model_name, "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == N_TOKENS
        # the same 32 tokens: the server leaves special tokens out of the text, as the decode here does
        text = AutoTokenizer.from_pretrained(str(out)).decode(want, skip_special_tokens=True)
        assert r.json()["choices"][0]["text"] == text
    finally:
        server.stop()


@pytest.mark.parametrize(("adapter", "why"), [
    ("nope", "neither a folder nor an adapter"),
    ("qv8*0.5+nope", "'nope' is neither"),
    ("qv8*+ku12", "malformed adapter mix"),
    ("+".join(f"a{i}" for i in range(9)), "at most 8"),
])
def test_merge_refuses_bad_adapters(adapter, why, store, tmp_path, capsys):
    assert merge("--adapter", adapter, "--adapter-dir", str(store), "--out", str(tmp_path / "out")) == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merge_refuses_a_non_empty_folder_without_force(adapters, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert merge("--adapter", str(adapters["qv8"]), "--out", str(tmp_path)) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
