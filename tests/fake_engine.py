"""A pure-Python stand-in for LLMEngine, for the AsyncEngine tests (threading, aborts, a step that raises).

The HTTP API tests run on the real engine; do not grow this into a second engine."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from lora_factory import TINY_SHAPES

from hotlora.adapters.peft_format import read_adapter_config
from hotlora.adapters.registry import AdapterInfo
from hotlora.server.engine.types import FinishReason, Request, RequestOutput


class UnknownAdapterError(KeyError):
    pass


class PromptTooLongError(ValueError):
    pass


class EngineOverloadedError(RuntimeError):
    pass


class FakeRegistry:
    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}

    def register(self, name: str, path: Path) -> None:
        read_adapter_config(Path(path))
        self.paths[name] = Path(path)

    def remove(self, name: str) -> None:
        if self.paths.pop(name, None) is None:
            raise UnknownAdapterError(name)

    def __contains__(self, name: str) -> bool:
        return name in self.paths

    def names(self) -> list[str]:
        return sorted(self.paths)

    def pin(self, name: str) -> None:
        if name not in self.paths:
            raise UnknownAdapterError(name)

    unpin = pin

    def info(self) -> list[AdapterInfo]:
        return [AdapterInfo(n, 4, 8.0, ["q_proj"], 1, "0" * 64, "disk", False, None, 0, 0, 0) for n in self.names()]


@dataclass
class FakeEngine:
    """Each step gives every sequence one token "t<k> "; it finishes after max_tokens with LENGTH."""

    step_delay: float = 0.0
    max_waiting: int = 100
    model_name: str = "fake-base"
    max_model_len: int = 1 << 20
    tokenizer: object = None
    model_config: object = field(
        default_factory=lambda: SimpleNamespace(linear_shapes=lambda: TINY_SHAPES, num_layers=2)
    )
    registry: FakeRegistry = field(default_factory=FakeRegistry)
    seqs: dict[str, list] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    fail_next_step: bool = False
    thread: threading.Thread | None = None

    def add_request(self, req: Request) -> None:
        self.thread = threading.current_thread()
        if req.adapter is not None and req.adapter not in self.registry:
            raise UnknownAdapterError(req.adapter)
        if len(req.prompt_token_ids) >= self.max_model_len:
            raise PromptTooLongError("prompt too long")
        if len(self.seqs) >= self.max_waiting:
            raise EngineOverloadedError("too many")
        self.seqs[req.request_id] = [req, 0]

    def abort(self, request_id: str) -> None:
        if self.seqs.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def step(self) -> list[RequestOutput]:
        assert threading.current_thread() is self.thread, "the engine is only touched from its own thread"
        time.sleep(self.step_delay)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        outs = []
        for rid, entry in list(self.seqs.items()):
            req, k = entry
            entry[1] = k = k + 1
            done = k >= req.params.max_tokens
            if done:
                del self.seqs[rid]
            outs.append(
                RequestOutput(
                    rid,
                    f"t{k} ",
                    [k],
                    finished=done,
                    finish_reason=FinishReason.LENGTH if done else None,
                    prompt_tokens=len(req.prompt_token_ids),
                    completion_tokens=k,
                )
            )
        return outs

    def stats(self) -> SimpleNamespace:
        adapters = sorted({e[0].adapter for e in self.seqs.values() if e[0].adapter})
        return SimpleNamespace(
            num_running=len(self.seqs),
            num_waiting=0,
            kv_blocks_total=10,
            kv_blocks_used=len(self.seqs),
            running_adapters=adapters,
            waiting_adapters=[],
            max_loras=2,
            num_preemptions=0,
        )
