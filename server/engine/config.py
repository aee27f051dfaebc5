"""Engine configuration: every knob of `hotlora serve` that reaches the engine."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

QUANT_CHOICES = ("nf4", "none")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
# the KV cache's element type: auto = the model's dtype; fp8 (= fp8_e4m3) stores K and V as float8_e4m3fn, unscaled
# (values past +-448 saturate), as vLLM's --kv-cache-dtype fp8 without calibrated scales: half the bytes of bf16
KV_CACHE_DTYPE_CHOICES = ("auto", "fp8", "fp8_e4m3")
SCHEDULING_POLICIES = ("fcfs", "priority")
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


# (max_num_seqs, max_num_batched_tokens) when not given. On the H200, 240 requests at once through HTTP
# produced 4,297 output tok/s with 128 / 4096 against 3,626 with 64 / 2048 (BENCHMARKS.md, fourth session),
# and 4,641 (base) / 4,389 (Zipf over 128 adapters) with 256 against 4,373 / 3,763 with 128 (eighteenth
# session): a decode step reads the weights once for more rows, and a step of more tokens amortizes the NF4
# dequantization over them. The CPU keeps small steps (its step time grows with the rows).
DEVICE_DEFAULTS = {"cuda": (256, 4096), "cpu": (64, 2048)}


@dataclass(slots=True)
class EngineConfig:
    model: str = "default"  # "default", a local HF folder, a .gguf file, or "random:<preset>"
    quant: str = "nf4"
    device: str = "auto"  # "auto" picks cuda when present
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    cache_dir: Path | None = None  # converted GGUF models; None = HOTLORA_CACHE or ~/.cache/hotlora
    tokenizer: Path | None = None  # a tokenizer folder used instead of the model's (random weights have none)
    adapter_dir: Path | None = None  # adapter store: every PEFT folder in it is registered at start
    max_loras: int = 8  # adapters resident on the device at once (slots)
    max_lora_rank: int = 64
    lora_pool_rows: int | None = None  # rows of the per-module LoRA pools; None = max_loras * max_lora_rank
    lora_rank_classes: bool = True  # LoRA tiles sized by each step's largest adapter rank; False: by max_lora_rank
    max_cpu_lora_bytes: int = 2 << 30  # host-memory budget for loaded adapter copies
    max_adapter_wait_steps: int = 64  # steps a request may be passed over for resident adapters' requests
    scheduling_policy: str = "fcfs"  # SCHEDULING_POLICIES: "priority" orders by each request's priority first
    # running sequences at once, and tokens (prefill + decode) in one step; None: by device (DEVICE_DEFAULTS)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # None = the model's max_position_embeddings, capped at 8192
    block_size: int = 16
    num_kv_blocks: int | None = None  # None = sized from kv_cache_memory
    kv_cache_memory: float = 0.5  # fraction of free device memory for the KV cache (cuda), or GiB (cpu)
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPE_CHOICES
    max_waiting: int = 1024  # requests queued before add_request refuses (overload)
    seed: int = 0
    cuda_graphs: bool = True  # replay every step from CUDA graphs captured at startup (cuda only)
    async_scheduling: bool = True  # build each step while the previous one runs on the device (cuda only)
    # with async_scheduling: build the next step just before the device needs it, so that requests arriving
    # meanwhile join it (server/engine/pacer.py)
    launch_pacing: bool = True
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before (per adapter version)

    def __post_init__(self) -> None:
        if self.quant not in QUANT_CHOICES:
            raise ValueError(f"quant must be one of {QUANT_CHOICES}, got {self.quant!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPE_CHOICES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPE_CHOICES}, got {self.kv_cache_dtype!r}")
        for name in ("max_loras", "max_lora_rank", "max_adapter_wait_steps", "max_num_seqs", "max_num_batched_tokens",
                     "block_size"):
            value = getattr(self, name)
            if value is None and name in ("max_num_seqs", "max_num_batched_tokens"):
                continue  # filled by for_device; None elsewhere would only fail later, deep in the engine
            if value is None or value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.lora_pool_rows is not None and self.lora_pool_rows < self.max_lora_rank:
            # an adapter of the largest accepted rank must fit the pool: one that cannot is accepted at upload
            # and then fails its every request
            raise ValueError(f"lora_pool_rows ({self.lora_pool_rows}) must be at least max_lora_rank "
                             f"({self.max_lora_rank})")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0, got {self.kv_cache_memory}")
        if not DEVICE_RE.fullmatch(self.device):  # else torch's own error, after the model has loaded for a while
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        # '~' expanded as default_cache_dir() expands it (an environment variable is not expanded by a shell)
        for name in ("cache_dir", "adapter_dir", "tokenizer"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)).expanduser())

    def for_device(self, device_type: str) -> None:
        """Fill the scheduling limits left at None with the device's defaults (once the device is known)."""
        seqs, tokens = DEVICE_DEFAULTS.get(device_type, DEVICE_DEFAULTS["cpu"])
        if self.max_num_seqs is None:
            self.max_num_seqs = seqs
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = tokens
