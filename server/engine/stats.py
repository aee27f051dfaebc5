"""What the engine reports and the errors it refuses requests with (re-exported by hotlora.server.engine.engine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EngineOverloadedError", "EngineStats", "InvalidRequestError", "PromptTooLongError"]


class InvalidRequestError(ValueError):
    """A request the engine refuses as given (the API answers 400, naming `param`: the request field at fault,
    where one is)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    pass


class EngineOverloadedError(RuntimeError):
    """Too many requests are queued (the API answers 429/503)."""


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    running_adapters: list[str]
    waiting_adapters: list[str]
    max_loras: int
    num_preemptions: int
    lora_slots_used: int = 0  # device slots holding (or loading) an adapter or a mix
    num_adapter_blocked_steps: int = 0  # steps with room in the batch where every waiting request awaited its adapter
    adapter_load_seconds: dict[str, Any] = field(default_factory=dict)  # transition -> loadstats.Histogram
    num_eager_steps: int = 0  # steps that ran eagerly (on cuda: no CUDA graph fitted or a capture failed)
    num_graph_steps: int = 0  # steps replayed from CUDA graphs
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found there
    block_size: int = 0  # tokens per KV-cache block
    kv_cache_dtype: str = "auto"  # EngineConfig.kv_cache_dtype
    step_phase_seconds: dict[str, Any] = field(default_factory=dict)  # phase -> loadstats.Histogram (steptimer)
    step_tokens: Any = None  # loadstats.Histogram of the tokens scheduled per model step
