"""What one running server holds: settings, the engine thread, the adapter store, metrics."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotlora.adapters.archive import MAX_SMALL_FILE_BYTES
from hotlora.adapters.peft_format import AdapterError, check_compatible, max_adapter_bytes
from hotlora.adapters.store import DEFAULT_MAX_BYTES, AdapterStore
from hotlora.server.api.errors import APIError
from hotlora.server.api.limits import DEFAULT_MAX_BODY_BYTES, TokenizerPool
from hotlora.server.api.metrics import Metrics
from hotlora.server.engine.async_engine import AsyncEngine
from hotlora.server.engine.config import EngineConfig

log = logging.getLogger(__name__)


def default_adapter_dir(config: EngineConfig) -> Path:
    env = os.environ.get("HOTLORA_CACHE_DIR") or os.environ.get("HOTLORA_CACHE")
    cache = config.cache_dir or Path(env or "~/.cache/hotlora").expanduser()
    return Path(cache) / "adapters"


@dataclass
class ServerSettings:
    engine: EngineConfig = field(default_factory=EngineConfig)
    admin_token: str | None = None  # None: the admin API answers 403
    served_model_name: str | None = None  # the base model's name in the API; None = the engine's name
    max_upload_bytes: int = DEFAULT_MAX_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # /v1 request bodies; larger ones are answered 413
    shutdown_grace_s: float = 30.0  # on SIGTERM: how long running requests may take to finish


def _default_factory(config: EngineConfig) -> Callable[[], Any]:
    def build() -> Any:
        from hotlora.server.engine.engine import LLMEngine  # torch: only in the engine thread's import

        return LLMEngine(config)

    return build


class AppState:
    def __init__(self, settings: ServerSettings, engine_factory: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.admin_token = settings.admin_token
        self.metrics = Metrics()
        self.adapter_dir = Path(settings.engine.adapter_dir or default_adapter_dir(settings.engine))
        self.engine = AsyncEngine(engine_factory or _default_factory(settings.engine), on_ready=self._on_ready)
        self.store: AdapterStore | None = None
        self.refused: dict[str, str] = {}  # adapters in the store that are not served: name -> why
        self.upload_limit = settings.max_upload_bytes  # bytes of one upload body, once the base is known
        self.model_name = settings.served_model_name or ""
        self.aliases: set[str] = set()
        self.tokenizer: Any = None
        self.max_model_len = 0
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self.tokenizers = TokenizerPool()
        self.draining = False  # set on SIGTERM: no new work, running requests finish
        self.export_lock = asyncio.Lock()  # one merge export at a time (CPU and disk heavy)

    # --- start-up (engine thread) ------------------------------------------------------------------

    def _on_ready(self, engine: Any) -> None:
        """Runs in the engine thread once the model is loaded: open the store, register what it holds."""
        cfg = engine.model_config
        shapes, layers, max_rank = cfg.linear_shapes(), cfg.num_layers, self.settings.engine.max_lora_rank
        # what an adapter of the largest allowed rank can be for this base bounds what an upload may unpack to
        bound = max_adapter_bytes(shapes, layers, max_rank) + 2 * MAX_SMALL_FILE_BYTES
        self.store = AdapterStore(
            self.adapter_dir,
            check=lambda a: check_compatible(a, shapes, layers, max_rank),
            max_bytes=min(self.settings.max_upload_bytes, bound),
        )
        self.upload_limit = min(self.settings.max_upload_bytes, bound + (1 << 20))  # + archive/multipart framing
        self.refused = dict(self.store.refused)
        for name in self.store.list():
            try:
                engine.registry.register(name, self.store.path(name))
            except (AdapterError, OSError, KeyError) as exc:
                self.refused[name] = str(exc)
        for name, why in self.refused.items():
            log.warning("adapter %r in %s is not served: %s", name, self.adapter_dir, why)
        self.model_name = self.settings.served_model_name or engine.model_name
        self.aliases = {self.model_name, engine.model_name}
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.tokenizers.configure(self.tokenizer, self.max_model_len)
        log.info(
            "model %s ready (context %d tokens, %d adapter(s) from %s)",
            self.model_name,
            self.max_model_len,
            len(engine.registry.names()),
            self.adapter_dir,
        )

    async def watch_startup(self) -> None:
        try:
            await self.engine.wait_ready()
        except BaseException as exc:
            if self.on_fatal is not None:
                self.on_fatal(exc)

    # --- per request -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.engine.ready.is_set() and not self.engine.stopped.is_set() and not self.draining

    def require_ready(self) -> None:
        if self.ready:
            return
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.engine.error is not None:
            raise APIError(503, f"the model failed to load: {self.engine.error}", code="engine_failed")
        if self.engine.stopped.is_set():
            raise APIError(503, "the server is shutting down", code="shutting_down")
        raise APIError(
            503,
            "the model is still loading; GET /ready says when it is done",
            code="loading",
            headers={"Retry-After": "5"},
        )

    def adapter_for(self, model: str) -> str | None:
        """None for the base model, else the adapter name (the engine says whether it exists)."""
        return None if model in self.aliases else model

    def lock(self, name: str) -> asyncio.Lock:
        """One lock per adapter name: upload/delete + register/remove happen as one step."""
        return self._locks.setdefault(name, asyncio.Lock())
