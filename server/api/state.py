"""What one running server holds: settings, the engine thread, the adapter store, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotlora.adapters.archive import MAX_SMALL_FILE_BYTES
from hotlora.adapters.peft_format import AdapterError, check_compatible, check_finite_as, max_adapter_bytes
from hotlora.adapters.s3store import S3AdapterStore, StoreUnavailable, parse_s3_url
from hotlora.adapters.store import DEFAULT_MAX_BYTES, AdapterNotFound, AdapterStore
from hotlora.server.api.errors import APIError
from hotlora.server.api.gcheap import freeze_startup_heap
from hotlora.server.api.limits import DEFAULT_MAX_BODY_BYTES, TokenizerPool
from hotlora.server.api.metrics import Metrics
from hotlora.server.api.tool_parsers import PARSERS
from hotlora.server.api.tools import pick_parser
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
    adapter_store: str | None = None  # s3://bucket/prefix: the shared store (None: the local adapter_dir)
    s3_endpoint_url: str | None = None  # MinIO and other S3-compatible servers
    adapter_store_ttl_s: float = 5.0  # how long a replica trusts the pointer it last read from the shared store
    gc_freeze: bool = True  # once ready, freeze the start-up heap out of the cyclic GC (server/api/gcheap.py)
    tool_call_parser: str = "auto"  # how "auto" tool choice reads calls: auto (from the template), a format, none
    allowed_lora_paths: tuple[Path, ...] = ()  # folders POST /v1/load_lora_adapter reads from; none: it answers 403

    def __post_init__(self) -> None:
        if self.adapter_store is not None:
            parse_s3_url(self.adapter_store)
        if self.adapter_store_ttl_s < 0:
            raise ValueError("adapter_store_ttl_s must be >= 0")
        if self.tool_call_parser not in PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}")


def _default_factory(config: EngineConfig) -> Callable[[], Any]:
    def build() -> Any:
        from hotlora.server.engine.engine import LLMEngine  # torch: only in the engine thread's import

        return LLMEngine(config)

    return build


def _resident_hint(registry: Any, version: Any) -> bool:
    """Whether `version` sits in a ready device slot, read racily from outside the engine thread: the slot
    may change under us, so every step tolerates a vanished entry."""
    slot = registry.cache.index.get(version) if version is not None else None
    entry = registry.cache.slots[slot] if slot is not None else None
    return entry is not None and entry.key is version and bool(entry.ready)


class AppState:
    def __init__(self, settings: ServerSettings, engine_factory: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.admin_token = settings.admin_token
        self.metrics = Metrics()
        self.adapter_dir = Path(settings.engine.adapter_dir or default_adapter_dir(settings.engine))
        self.engine = AsyncEngine(engine_factory or _default_factory(settings.engine), on_ready=self._on_ready)
        self.store: AdapterStore | S3AdapterStore | None = None
        self.refused: dict[str, str] = {}  # adapters in the store that are not served: name -> why
        self.upload_limit = settings.max_upload_bytes  # bytes of one upload body, once the base is known
        self.model_name = settings.served_model_name or ""
        self.aliases: set[str] = set()
        self.tokenizer: Any = None
        self.tool_parser: str | None = None  # what reads "auto" tool calls (server/api/tools.py)
        self.max_model_len = 0
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._locks: dict[str, list] = {}  # name -> [lock, holders and waiters] (lock())
        self.tokenizers = TokenizerPool()
        self.draining = False  # set on SIGTERM: no new work, running requests finish
        self.export_lock = asyncio.Lock()  # one merge export at a time (CPU and disk heavy)
        self.gc_frozen = False  # set by _on_ready (settings.gc_freeze); the app's shutdown thaws

    # --- start-up (engine thread) ------------------------------------------------------------------

    def _on_ready(self, engine: Any) -> None:
        """Runs in the engine thread once the model is loaded: open the store, register what it holds."""
        cfg = engine.model_config
        shapes, layers, max_rank = cfg.linear_shapes(), cfg.num_layers, self.settings.engine.max_lora_rank
        # what an adapter of the largest allowed rank can be for this base bounds what an upload may unpack to
        bound = max_adapter_bytes(shapes, layers, max_rank) + 2 * MAX_SMALL_FILE_BYTES
        pool_dtype = engine.registry.cache.dtype

        def check(adapter: Any) -> None:
            check_compatible(adapter, shapes, layers, max_rank)
            check_finite_as(adapter, pool_dtype)

        self.store = self._open_store(check, min(self.settings.max_upload_bytes, bound))
        self.upload_limit = min(self.settings.max_upload_bytes, bound + (1 << 20))  # + archive/multipart framing
        self.refused = dict(self.store.refused)
        # the shared store is read lazily: only the versions cached here before a restart are registered now
        names = self.store.list() if isinstance(self.store, AdapterStore) else sorted(self.store.known)
        for name in names:
            try:
                engine.registry.register(name, self.store.path(name))
            except (AdapterError, OSError, KeyError) as exc:
                self.refused[name] = str(exc)
        for name, why in self.refused.items():
            log.warning("adapter %r in %s is not served: %s", name, self.adapter_dir, why)
        pinned = engine.registry.warm_staging()
        if pinned:
            log.info("pinned %.2f GiB of staging memory for the registered adapters' loads", pinned / 2**30)
        self.model_name = self.settings.served_model_name or engine.model_name
        self.aliases = {self.model_name, engine.model_name}
        self.tokenizer = engine.tokenizer
        self.tool_parser = pick_parser(self.settings.tool_call_parser, getattr(self.tokenizer, "chat_template", None))
        self.max_model_len = engine.max_model_len
        self.tokenizers.configure(self.tokenizer, self.max_model_len)
        log.info(
            "model %s ready (context %d tokens, %d adapter(s) from %s)",
            self.model_name,
            self.max_model_len,
            len(engine.registry.names()),
            self.adapter_dir,
        )
        if self.settings.gc_freeze:
            frozen, seconds = freeze_startup_heap()
            self.gc_frozen = True
            log.info("froze the start-up heap out of the garbage collector: %d objects, %.0f ms", frozen,
                     seconds * 1000)

    def _open_store(self, check: Callable[[Any], None], max_bytes: int) -> AdapterStore | S3AdapterStore:
        """The local directory store, or with adapter_store=s3://... the shared one, cached under adapter_dir
        (whose versions cached before a restart are registered, and served while the store is unreachable)."""
        url = self.settings.adapter_store
        if url is None:
            return AdapterStore(self.adapter_dir, check=check, max_bytes=max_bytes)
        bucket, prefix = parse_s3_url(url)
        cache = self.adapter_dir / "s3" / bucket / (prefix.replace("/", "~") or "~")
        return S3AdapterStore(url, cache, check=check, max_bytes=max_bytes, endpoint_url=self.settings.s3_endpoint_url)

    async def sync_adapter(self, name: str) -> None:
        """With the shared store: make the engine serve `name` as the store has it now, within the TTL, and
        at once if the adapter is not resident on this replica (a cold load). Whether it is resident is read
        from the event loop without a round trip to the engine thread: a hint only, and at worst one more
        conditional GET. A replaced version stays with the sequences that hold it (registry.register)."""
        store = self.store
        if not isinstance(store, S3AdapterStore):
            return
        registry = self.engine.engine.registry
        current = registry.current.get(name)
        ttl = self.settings.adapter_store_ttl_s if _resident_hint(registry, current) else 0.0
        if current is not None and store.is_fresh(name, ttl):
            return
        arrived = time.monotonic()
        async with self.lock(name):
            # requests that queued here for one cold load share the check made after the first of them arrived
            if name in registry and store.is_fresh(name, time.monotonic() - arrived):
                return
            try:
                path = await asyncio.to_thread(store.sync, name, ttl)
            except AdapterNotFound:
                if name in registry:
                    await self.engine.call(registry.remove, name)
                return  # the engine answers 404 for a name it does not know
            except StoreUnavailable as exc:
                if name in registry:
                    return
                raise APIError(503, f"adapter {name!r} is not cached here and {exc}", code="store_unavailable",
                               headers={"Retry-After": "5"}) from None
            except AdapterError as exc:
                self.refused[name] = str(exc)
                return
            current = registry.current.get(name)
            if current is None or current.path != path:
                try:
                    await self.engine.call(registry.register, name, path)
                except (AdapterError, OSError) as exc:
                    self.refused[name] = str(exc)
                    return
            self.refused.pop(name, None)

    async def watch_startup(self) -> None:
        try:
            await self.engine.wait_ready()
        except asyncio.CancelledError:  # the server stops while the model loads (SIGTERM): not a load failure
            raise
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

    @contextlib.asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[None]:
        """One lock per adapter name: upload/delete + register/remove happen as one step. Dropped once no one
        holds or waits for it: with the shared store any request's model name takes one, and they were kept
        forever (one per unknown name a client sent)."""
        entry = self._locks.setdefault(name, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._locks[name]
