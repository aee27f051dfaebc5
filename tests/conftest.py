"""Shared fixtures. One model cache per test run: $HOTLORA_CACHE, else <repo>/.cache/hotlora.

The cache location is exported as HOTLORA_CACHE before any test runs, so code that resolves a model
without an explicit cache_dir (the runner, the CLI) shares the one GGUF conversion too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HOTLORA_CACHE", str(REPO_ROOT / ".cache" / "hotlora"))
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the hub


@pytest.fixture(params=["cpu-triton", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])  # fmt: skip
def kernel_device(request, monkeypatch) -> str:
    """Where a kernel test runs its Triton kernels: the CPU under TRITON_INTERPRET=1 (CI), and the GPU."""
    if request.param == "cpu-triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (set by make test)")
        monkeypatch.setenv("HOTLORA_TRITON_CPU", "1")
        return "cpu"
    return "cuda"


@pytest.fixture(scope="session")
def hotlora_cache() -> Path:
    path = Path(os.environ["HOTLORA_CACHE"])
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def default_checkpoint(hotlora_cache: Path):  # -> hotlora.server.model.weights.Checkpoint
    """The embedded SmolLM2-135M-Instruct, converted from its GGUF once per cache (~30 s the first time)."""
    from hotlora.server.model.weights import DEFAULT_MODEL, resolve_checkpoint

    return resolve_checkpoint(DEFAULT_MODEL, hotlora_cache, progress=False)


@pytest.fixture(scope="session")
def default_model_dir(default_checkpoint) -> Path:
    """The converted default model as an HF folder (config.json, model.safetensors, tokenizer)."""
    return default_checkpoint.path


@pytest.fixture(scope="session")
def adapters(default_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Four PEFT adapters saved by peft on the default model (engine_reference.ADAPTER_SPECS)."""
    from engine_reference import save_adapters

    return save_adapters(default_model_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="session")
def gpu_model_dir(tmp_path_factory) -> Path:
    """The GPU tests' random-weight SmolLM2-135M, embeddings scaled down (engine_reference.BF16_EMBED_SCALE)."""
    from engine_reference import BF16_EMBED_SCALE, save_random_model

    return save_random_model("smollm2-135m", tmp_path_factory.mktemp("random-smollm2"), embed_scale=BF16_EMBED_SCALE)


@pytest.fixture(scope="session")
def gpu_adapters(gpu_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """The GPU tests' adapters (engine_reference.ADAPTER_SPECS) on gpu_model_dir."""
    from engine_reference import save_adapters

    return save_adapters(gpu_model_dir, tmp_path_factory.mktemp("gpu-adapters"), b_std=0.05)


@pytest.fixture(scope="session")
def store_folders(tmp_path_factory) -> dict[str, Path]:
    """Three PEFT folders on lora_factory's tiny Llama, of ranks 2, 4 and 8 (the adapter-store tests)."""
    from lora_factory import save_adapter, tiny_llama

    base, root = tiny_llama(), tmp_path_factory.mktemp("store-peft")
    return {
        "r2": save_adapter(base, root / "r2", seed=1, r=2),
        "r4": save_adapter(base, root / "r4", seed=2, r=4, target_modules=["o_proj", "down_proj"]),
        "r8": save_adapter(base, root / "r8", seed=3, r=8),
    }


@pytest.fixture(scope="session")
def peft_dirs(default_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """The server tests' adapters, saved by peft on the default model (lora_factory.server_adapters)."""
    from lora_factory import server_adapters

    return server_adapters(default_model_dir, tmp_path_factory.mktemp("peft"))


@pytest.fixture(scope="session")
def work(default_model_dir: Path) -> list[tuple[list[int], str | None]]:
    """The mixed batch the engine is compared on: (prompt ids, adapter) pairs."""
    from engine_reference import mixed_requests
    from transformers import AutoTokenizer

    return mixed_requests(AutoTokenizer.from_pretrained(str(default_model_dir), local_files_only=True))


# --- for modules that define a `server` fixture (a server_harness.ServerThread) ----------------------


@pytest.fixture
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def base(server) -> str:
    """The served base model's name."""
    return server.state.model_name


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def expected(server) -> str:
    """The bystander's text on adapter "a" when it runs alone (tests/bystander.py)."""
    from bystander import STREAM_TOKENS, solo_text

    return solo_text(server.url, "a", STREAM_TOKENS)


@pytest.fixture(scope="module")
def s3():
    """A real S3-compatible server (moto's server mode) on loopback, one per test module (tests/s3_harness.py)."""
    from s3_harness import s3_server

    with s3_server() as server:
        yield server
