"""Adapter registry: names -> versions, lazy disk -> host -> device loading, hot swap, pinning.

Only the engine thread calls into the registry. Nothing on the cold path blocks there: disk reads,
parsing and staging (into pinned memory on CUDA) run on a small thread pool, and the device copy runs on
the cache's side stream, issued by the engine thread in the shadow of a step on CUDA (cache.py); a request
naming a cold adapter waits for its own load while the rest of the batch keeps decoding. A read starts
when the request is queued (prefetch_version), within the host budget. A re-registered name gets a new
version; sequences already holding the old version finish on it. `read_hook(name)`, when set, runs on
the reading thread first: fault injection. A name such as "sql*0.7+chat*0.3" resolves to a weighted mix
of registered adapters (mixes.py). The records (versions, per-name statistics, info rows) are in
versions.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from hotlora.adapters.cache import LoraSlotCache
from hotlora.adapters.mixes import MixTable, MixVersion
from hotlora.adapters.mixspec import is_mix, parse_mix
from hotlora.adapters.peft_format import WEIGHTS_NAME, AdapterError, LoraAdapter, check_compatible, read_adapter_config
from hotlora.adapters.staging import StagedAdapter, from_adapter, parse_staged, read_raw, warm_pinned
from hotlora.adapters.versions import AdapterInfo, AdapterVersion, NameStats, UnknownAdapterError, hash_weights
from hotlora.adapters.warmcopy import warm_copy_path

log = logging.getLogger(__name__)


class AdapterRegistry:
    def __init__(self, cache: LoraSlotCache, linear_shapes: dict[str, tuple[int, int]], num_layers: int,
                 max_rank: int, host_budget_bytes: int) -> None:
        self.cache = cache
        self.linear_shapes, self.num_layers, self.max_rank = linear_shapes, num_layers, max_rank
        self.host_budget = host_budget_bytes
        self.current: dict[str, AdapterVersion] = {}
        self.stats: dict[str, NameStats] = {}
        self._versions = 0
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-load")
        self.read_hook: Callable[[str], None] | None = None
        self.mixes = MixTable(cache, max_rank)

    def __contains__(self, name: str) -> bool:
        return name in self.current

    def names(self) -> list[str]:
        return sorted(self.current)

    def register(self, name: str, path: Path, loaded: LoraAdapter | None = None) -> AdapterVersion:
        """Add `name`, or hot-swap it: the previous version stays alive for sequences that hold it.

        `loaded`: the adapter already read and validated (an upload), so that nothing here touches the
        disk; otherwise the config is read now and the weights and their sha256 on first use.
        """
        path = Path(path)
        config = loaded.config if loaded is not None else read_adapter_config(path)
        if config.rank > self.max_rank:
            raise AdapterError(f"rank r={config.rank} is above the server's maximum LoRA rank {self.max_rank}")
        version = AdapterVersion(name, path, self._next_version(), config, loaded.sha256 if loaded else None,
                                 (path / WEIGHTS_NAME).stat().st_size,
                                 host=from_adapter(loaded) if loaded is not None else None)
        old = self.current.get(name)
        self.current[name] = version
        stats = self.stats.setdefault(name, NameStats())
        if old is not None:
            self._retire(old)
            self.mixes.retire_component(old)
        if loaded is not None:
            self._trim_host(keep=version)
        else:  # hashing a large file is disk-bound: keep it off the engine thread
            self._pool.submit(hash_weights, version)
        if old is not None and stats.pinned:
            self._carry_pin(name, in_memory=loaded is not None)
        return version

    def _carry_pin(self, name: str, in_memory: bool) -> None:
        """A pinned adapter replaced: the new version is pinned in its place when its weights are in memory (an
        upload: pinning only copies them); else (a version another replica wrote to the shared store, read from
        disk) the pin ends rather than stall the engine thread on the read, and says so."""
        self.stats[name].pinned = False
        if in_memory:
            try:
                self.pin(name)
            except AdapterError as exc:
                log.warning("adapter %r replaced: its new version could not be pinned: %s", name, exc)
        else:
            log.warning("adapter %r replaced from the store: unpinned (pin it again to keep it resident)", name)

    def remove(self, name: str) -> None:
        old = self.current.pop(name, None)
        if old is None:
            raise UnknownAdapterError(name)
        self.stats.pop(name, None)
        self._retire(old)
        self.mixes.retire_component(old)

    def resolve(self, name: str) -> AdapterVersion | MixVersion:
        """The current version of `name`, or the mix it spells. UnknownAdapterError names the unknown
        adapter (a mix's component); AdapterError (a ValueError) for a malformed or too large mix."""
        if is_mix(name):
            spec = parse_mix(name)
            return self.mixes.get(spec, [self.resolve(n) for n in spec.names], self._next_version)
        try:
            return self.current[name]
        except KeyError:
            raise UnknownAdapterError(name) from None

    def _next_version(self) -> int:
        self._versions += 1
        return self._versions

    def _is_current(self, v: AdapterVersion | MixVersion) -> bool:
        if isinstance(v, MixVersion):
            return self.mixes.is_current(v)
        return self.current.get(v.name) is v

    def _retire(self, version: AdapterVersion) -> None:
        """Free the device slot of a replaced version now if idle (else when its last user releases it).

        Its eviction count moves to the name's stats: the cache must not keep the version (and through
        it the host copy of its weights) alive as a dictionary key.
        """
        slot = self.cache.lookup(version)
        if slot is not None:
            self.cache.set_pinned(slot, False)
        else:
            version.host = None
        self.cache.evict(version)
        evicted = self.cache.evictions.pop(version, 0)
        if version.name in self.stats:
            self.stats[version.name].evictions += evicted

    # --- residency -------------------------------------------------------------------------------

    def acquire(self, v: AdapterVersion | MixVersion) -> int | None:
        """The device slot of `v`, held for one sequence; None while it is still loading or no slot is free.

        Raises AdapterError when the adapter's files failed to load.
        """
        slot = self.cache.lookup(v)
        stats = self.stats.get(v.name) if self.current.get(v.name) is v else None
        if slot is None:
            host = self.mixes.staged(v, self._host) if isinstance(v, MixVersion) else self._host(v)
            if host is None:
                return None
            slot = self.cache.reserve(v, host)
            if slot is None:
                return None
            if stats:
                stats.loads += 1
        try:
            if not self.cache.poll(slot):
                return None
        except Exception as exc:
            raise AdapterError(self._copy_failed(v, exc)) from None
        hit = self.cache.acquire(slot)
        if stats:
            stats.hits += hit
            stats.last_used = time.time()
        return slot

    def is_ready(self, v: AdapterVersion | MixVersion) -> bool:
        """On the device and usable now (the scheduler prefers requests whose adapter is)."""
        slot = self.cache.lookup(v)
        return slot is not None and self.cache.slots[slot].ready

    def release(self, v: AdapterVersion | MixVersion, slot: int) -> None:
        self.cache.release(slot)
        if not self._is_current(v):  # a replaced or deleted version (or a retired mix) leaves with its last user
            self.cache.evict(v)

    def poll(self) -> None:
        """Once per step: publish finished device copies. (A retired version's copy is kept: a request
        queued before the swap may be waiting for it; it leaves with its last user, or by LRU.)"""
        for slot, s in enumerate(self.cache.slots):
            if s is None or s.ready:
                continue
            try:
                self.cache.poll(slot)
            except Exception as exc:  # its slot is free again; the waiting requests fail on v.error
                self._copy_failed(s.key, exc)

    def _copy_failed(self, v: AdapterVersion | MixVersion, exc: Exception) -> str:
        if not isinstance(exc, AdapterError):
            log.error("copying adapter %r to the device failed: %s", v.name, exc)
        v.error, v.host = f"adapter {v.name!r} failed to load: {exc}", None
        return v.error

    def loading(self) -> list[Future]:
        reads = [v.loading for v in self.current.values() if v.loading is not None and not v.loading.done()]
        return reads + self.cache.pending()

    def _host(self, v: AdapterVersion) -> StagedAdapter | None:
        if v.host is not None:
            return v.host
        if v.error is not None:
            raise AdapterError(v.error)
        if v.loading is None:
            v.loading = self._pool.submit(self._read, v)
        if not v.loading.done():
            return None
        try:
            v.host = v.loading.result()
            v.sha256 = v.host.sha256 or v.sha256
        except (AdapterError, OSError) as exc:
            v.error = f"adapter {v.name!r} failed to load: {exc}"
            raise AdapterError(v.error) from None
        finally:
            v.loading = None
        self._trim_host(keep=v)
        return v.host

    def _read(self, v: AdapterVersion) -> StagedAdapter:
        """On a reading thread: the file into one buffer (pinned on CUDA), then its header and shapes
        validated; each phase timed. Finiteness is checked by the device copy."""
        if self.read_hook is not None:
            self.read_hook(v.name)
        rec = self.cache.stats
        t0 = time.perf_counter()
        raw = read_raw(v.path, pin=self.cache.device.type == "cuda", lock=self.cache.copy_lock)
        t1 = time.perf_counter()
        staged = parse_staged(raw, v.path, v.name)
        check_compatible(staged, self.linear_shapes, self.num_layers, self.max_rank)
        t2 = time.perf_counter()
        rec.record("disk_read", t1 - t0)
        rec.record("parse", t2 - t1)
        rec.observe("disk_to_cpu", t2 - t0)
        return staged

    def _hosted_bytes(self) -> int:
        hosted = sum(v.host.nbytes for v in self.current.values() if v.host is not None)
        return hosted + sum(v.file_bytes for v in self.current.values() if v.loading is not None)

    def _trim_host(self, keep: AdapterVersion) -> None:
        """Drop host copies, least recently used first, down to the budget; never `keep`'s, which is about to
        be copied to the device (dropping it would make that load start over, forever, once the copies of
        the adapters on the device alone exceed the budget). A dropped copy is read from disk again if
        its adapter is evicted from the device and used later; a copy to the device in flight keeps its
        own reference until it is done."""
        hosted = [v for v in self.current.values() if v.host is not None and v is not keep]
        total = sum(v.host.nbytes for v in hosted) + (keep.host.nbytes if keep.host is not None else 0)
        hosted.sort(key=lambda v: self.stats[v.name].last_used or 0.0)
        for v in hosted:
            if total <= self.host_budget:
                break
            total -= v.host.nbytes
            v.host = None

    # --- admin -------------------------------------------------------------------------------------

    def prefetch(self, name: str) -> Future | None:
        """Start reading `name` from disk in the background; the future to wait on, or None if in memory."""
        v = self.resolve(name)
        if v.host is not None or v.error is not None:
            return None
        if v.loading is None:
            v.loading = self._pool.submit(self._read, v)
        return v.loading

    def prefetch_version(self, v: AdapterVersion | MixVersion) -> None:
        """A request for `v` was queued: start its disk read now if it is cold. Room in the host budget is
        made by dropping the host copies of adapters already usable on the device, least recently used
        first (they are read from disk again only if evicted and used later); if there is still no room,
        it is read when the request is admitted, and the budget is trimmed then. A mix's components are
        read unless the mix is on the device already.

        Without that, host copies of device-resident adapters fill the budget in steady state, prefetch
        stops, and under adapter churn every cold load starts only at the head of the queue."""
        if isinstance(v, MixVersion):
            if self.cache.lookup(v) is None:
                for c in v.components:
                    self.prefetch_version(c)
            return
        if v.host is not None or v.loading is not None or v.error is not None or self.cache.lookup(v) is not None:
            return
        if self._hosted_bytes() + v.file_bytes > self.host_budget:
            self._drop_resident_host_copies(v.file_bytes)
        if self._hosted_bytes() + v.file_bytes <= self.host_budget:
            v.loading = self._pool.submit(self._read, v)

    def _drop_resident_host_copies(self, need: int) -> None:
        resident = [u for u in self.current.values() if u.host is not None and self.is_ready(u)]
        resident.sort(key=lambda u: self.stats[u.name].last_used or 0.0)
        free = self.host_budget - self._hosted_bytes()
        for u in resident:
            if free >= need:
                break
            free += u.host.nbytes
            u.host = None

    def pin(self, name: str) -> None:
        """Load `name` onto the device and keep it there until unpinned.

        Blocks on the disk read and the device copy if they have not finished: callers that must not
        stall the engine thread wait on prefetch(name) first (the copy then takes milliseconds). Refused when it
        would pin the last unpinned slot, or leave no run of max_rank consecutive unpinned pool rows: requests
        for other adapters (or the largest ones) would then wait forever. Pinned adapters are loaded at the top
        of the pool (unpinned ones fill it from the bottom), so pins do not split the free rows; one already
        resident where its pin would split them is copied to the top first, if no sequence uses it.
        """
        v = self.resolve(name)
        slot = self.cache.lookup(v)
        slots = self.cache.slots
        if slot is not None and slots[slot].pinned:
            self.stats[name].pinned = True
            return
        if sum(s is not None and s.pinned for s in slots) + 1 >= len(slots):
            raise AdapterError(f"pinning {name!r} would pin every device slot (--max-loras {len(slots)}): requests for "
                               "any other adapter or mix could never run; unpin one first, or raise --max-loras")
        resident = slot is not None
        if not resident:
            pending = self.prefetch(name)
            if pending is not None:
                pending.exception()  # wait; _host reports a failure
            slot = self._load_high(name, v)
        need = min(self.max_rank, self.cache.pool_rows)
        if self.cache.pinned_rows(also=slot) + need > self.cache.pool_rows:
            raise AdapterError(f"pinning {name!r} would leave fewer than {need} unpinned pool rows "
                               f"(--lora-pool-rows {self.cache.pool_rows}): adapters of rank {need} could never "
                               "load; unpin one first, or raise --lora-pool-rows")
        if resident and self.cache.largest_unpinned_run(also=slot) < need:  # move it to the top first
            if not self.cache.evict(v):
                raise AdapterError(f"{name!r} sits in the middle of the LoRA pool and running requests use it: "
                                   "pinning it there would split the unpinned rows; retry when it is idle")
            slot = self._load_high(name, v)
        if self.cache.largest_unpinned_run(also=slot) < need:
            raise AdapterError(f"pinning {name!r} would leave no {need} consecutive unpinned pool rows "
                               f"(--lora-pool-rows {self.cache.pool_rows}): adapters of rank {need} could "
                               "never load; unpin one first, or raise --lora-pool-rows")
        self.cache.set_pinned(slot, True)
        self.stats[name].pinned = True

    def _load_high(self, name: str, v: AdapterVersion) -> int:
        """Load `v` onto the device at the top of the pool (a pin's rows), waiting for the copy."""
        slot = self.cache.load(v, self._host(v), high=True)
        if slot is None:
            raise AdapterError("no free device slot: every slot is in use or pinned (raise --max-loras)")
        self.stats[name].loads += 1
        return slot

    def unpin(self, name: str) -> None:
        v = self.resolve(name)
        slot = self.cache.lookup(v)
        if slot is not None:
            self.cache.set_pinned(slot, False)
        self.stats[name].pinned = False

    def unload(self, name: str) -> bool:
        """Unpin `name` and free its device slot now if no sequence uses it (else when the last one
        finishes). The host copy stays, within the host budget. True when the slot is free now."""
        v = self.resolve(name)
        self.stats[name].pinned = False
        return self.cache.unload(v)

    def info(self) -> list[AdapterInfo]:
        out = []
        for name in self.names():
            v, st = self.current[name], self.stats[name]
            out.append(AdapterInfo(
                name=name, rank=v.config.rank, alpha=v.config.alpha,
                target_modules=sorted(v.config.target_modules), nbytes=v.file_bytes, sha256=v.sha256,
                residency="device" if self.is_ready(v) else "host" if v.host is not None else "disk",
                on_host=v.host is not None, pinned=st.pinned, last_used=st.last_used, loads=st.loads,
                hits=st.hits, evictions=st.evictions + self.cache.evictions.get(v, 0),
            ))
        return out

    def warm_staging(self) -> int:
        """On CUDA, pin (then cache) the staging blocks of the registered adapters' first loads, within the
        host budget, so that no load allocates pinned memory while the engine decodes; the bytes pinned."""
        if self.cache.device.type != "cuda":
            return 0
        sizes = [v.file_bytes for v in self.current.values()]
        return warm_pinned(sizes, self.host_budget, self.cache.copy_lock)

    def warm_copy(self, allow_cpu: bool = False) -> float | None:
        """On CUDA, before any load: one synthetic cold load through the copy path, its slot then freed, so that
        the first real load under decode does not pay the path's first-use costs (adapters/warmcopy.py); the
        seconds it took, None on CPU pools (unless `allow_cpu`) or with HOTLORA_WARM_ADAPTER_COPY=0. No name, count or
        load statistic records it."""
        return warm_copy_path(self.cache, self.linear_shapes, self.num_layers, self.max_rank, allow_cpu)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.cache.close()
