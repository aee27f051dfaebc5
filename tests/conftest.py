"""Shared fixtures. One model cache per test run: $HOTLORA_CACHE, else <repo>/.cache/hotlora.

The cache location is exported as HOTLORA_CACHE before any test runs, so code that resolves a model
without an explicit cache_dir (the runner, the CLI) shares the one GGUF conversion too.

`make test` runs the tests in pytest-xdist workers (`-n`, whole files per worker): see _xdist_threads and
pytest_collection_modifyitems for what that changes, and _exclusive for the cache the workers share.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HOTLORA_CACHE", str(REPO_ROOT / ".cache" / "hotlora"))
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the hub


def _xdist_threads() -> int | None:
    """Torch threads per xdist worker: the cores split between the workers (None outside xdist). Two OpenMP pools
    on the same cores wait on each other (see test_structured_throughput: steps up to 20x slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None


if (_THREADS := _xdist_threads()) is not None:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)  # before torch is imported; server subprocesses inherit it

import pytest  # noqa: E402
import torch  # noqa: E402

if _THREADS is not None:
    torch.set_num_threads(_THREADS)  # in case something imported torch before this file

# Heaviest test files first, so that under xdist (--dist loadfile --no-loadscope-reorder) no long file starts
# last on one worker while the others sit idle: seconds per file, measured serially on the 2-core CI machine.
# A file not listed keeps its place after these; the order changes nothing else.
HEAVY_FIRST = (
    "test_ray_serve.py",  # 137 s
    "test_server_tools.py",  # 65 s
    "test_engine_async.py",  # 58 s
    "test_engine_prefix_cache.py",  # 58 s
    "test_engine_equivalence.py",  # 53 s
    "test_lora_kernels.py",  # 52 s
    "test_lora_rank_classes.py",  # 51 s
    "test_server_structured.py",  # 51 s
    "test_engine_architectures.py",  # 49 s
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _THREADS is None:
        return
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keeps its order


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state, whichever tests ran before it in its process (xdist
    workers run different subsets in different orders)."""
    random.seed(0)
    torch.manual_seed(0)


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Held by one process at a time: xdist workers build a shared cache once, the others wait for it."""
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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

    with _exclusive(hotlora_cache / ".tests.lock"):  # one conversion, not one per xdist worker
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
