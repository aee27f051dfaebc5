"""Device residency of adapters: per-layer row pools, slot tables, LRU eviction and pinning.

The pools follow the row-pool layout of hotlora.kernels (see kernels/_meta.py): an adapter of rank r
takes exactly r consecutive rows of every target module's pool, in every layer, so slots of small
rank leave room for more adapters and no kernel ever computes padding.

Loading a slot never blocks the engine thread on the copy: `reserve` takes the rows and queues the copy;
`poll` checks the copy's event and only then writes the slot-table entries (rank, row start, scale) that
make the slot visible to the kernels. A host copy read from disk is the raw file in one buffer
(adapters/staging.py; pinned on CUDA): the copy moves it to the device in one transfer, then casts and
transposes into the pool rows and checks finiteness there (adapters/poolwrite.py), all on a side stream
behind an event recorded at reserve time (rows freed by an eviction may still be read by a step in flight).

Who issues a copy's device work: on CUDA the engine thread, through `issue_pending`, right after it launched a
step (the runner calls it there: the GPU computes the step meanwhile), or at once when no step runs (the engine
with nothing to launch, `load`). A copy thread issued it before, and under decode its issue took 37-63 ms
instead of 2.3 ms: each torch call waited for the GIL that the engine and HTTP threads hold (BENCHMARKS.md,
issue 12). The CPU pools keep the copy thread ("adapter-h2d"): the CPU engine has no device to overlap, and
the copy's own time would stall its steps. `copy_thread` says which path new reservations take
(HOTLORA_ADAPTER_COPY_THREAD=1 sets it on CUDA too, for an A/B benchmark).

A weighted mix (adapters/compose.py) takes one slot of its summed rank; its copy writes each component's rows
in turn, with the component's weight and scale folded into A.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from hotlora.adapters.compose import StagedMix
from hotlora.adapters.loadstats import LoadStats
from hotlora.adapters.peft_format import TARGET_MODULES, AdapterError
from hotlora.adapters.poolwrite import PoolWriter
from hotlora.adapters.rowalloc import RowAllocator
from hotlora.adapters.staging import StagedAdapter
from hotlora.kernels.lora import LoraSlice


@dataclass(slots=True)
class Slot:
    key: Hashable  # whose weights the slot holds (the registry's version handle)
    row_start: int
    rank: int
    scale: float = 0.0
    refs: int = 0  # running sequences using it: never evicted while > 0
    pinned: bool = False
    last_used: int = 0
    ready: bool = True  # False while its weights are being copied in: not evictable, not usable
    fresh: bool = False  # loaded for a waiting request, not used yet (its first use is no cache hit)
    drop_when_idle: bool = False  # unloaded while in use: freed when the last user releases it
    ranks: dict[str, int] | None = None  # rows per module (0: the slot does not target it); set by reserve
    transfer: Future | None = None  # the copy; its result: _Copied
    started: float = 0.0  # perf_counter() at reserve


@dataclass(slots=True)
class _Job:
    """A reserved copy not issued yet (engine-thread issue): `future` gets its _Copied."""

    future: Future
    key: Hashable
    start: int
    adapter: StagedAdapter | StagedMix
    after: torch.cuda.Event | None


@dataclass(slots=True)
class _Copied:
    """What a copy's issue hands back: CUDA events to poll (None on CPU), and a host flag that says
    whether every weight was finite (None when not checked), valid once `done` has completed."""

    begin: torch.cuda.Event | None
    done: torch.cuda.Event | None
    finite: torch.Tensor | None


class LoraSlotCache:
    """`num_slots` device slots over pools of `pool_rows` rows per (layer, module).

    Only the engine thread calls it; the copies are issued by it (`issue_pending`) or by the copy thread.
    `copy_hook(key)`, when set, runs on the issuing thread before each copy: fault injection for tests.
    """

    def __init__(self, linear_shapes: dict[str, tuple[int, int]], num_layers: int, num_slots: int,
                 pool_rows: int, device: torch.device, dtype: torch.dtype) -> None:
        self.num_slots, self.pool_rows = num_slots, pool_rows
        self.device, self.dtype = torch.device(device), dtype
        self.row_start = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.scale = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.ranks = {m: torch.zeros(num_slots, dtype=torch.int32, device=device) for m in TARGET_MODULES}
        # host copy of each slot's largest per-module rank (0: free or loading): a step's rank class is read
        # from it without touching the device tables
        self.slot_rank = [0] * num_slots
        # one [layers, rows, features] tensor per module and side, so that a load writes a module of every
        # layer in one copy; each layer's kernels see its contiguous [rows, features] slice
        self.pools = {
            m: (torch.zeros(num_layers, pool_rows, linear_shapes[m][1], device=device, dtype=dtype),
                torch.zeros(num_layers, pool_rows, linear_shapes[m][0], device=device, dtype=dtype))
            for m in TARGET_MODULES
        }
        self.layers: list[dict[str, LoraSlice]] = [
            {m: LoraSlice(a=a[layer], b=b[layer], rank=self.ranks[m]) for m, (a, b) in self.pools.items()}
            for layer in range(num_layers)
        ]
        self.slots: list[Slot | None] = [None] * num_slots
        self.index: dict[Hashable, int] = {}
        self.rows = RowAllocator(pool_rows)
        self.clock = 0
        self.evictions: dict[Hashable, int] = {}
        self.stats = LoadStats()
        self.copy_hook: Callable[[Hashable], None] | None = None
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self.writer = PoolWriter(self.pools, num_layers, self.device)
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-h2d")
        self.copy_thread = not self._cuda or os.environ.get("HOTLORA_ADAPTER_COPY_THREAD") == "1"
        self._queued: list[_Job] = []  # reserved, for issue_pending (when not copy_thread)
        self.copy_lock = threading.Lock()  # held while copies are issued; CUDA graph capture takes it too

    def lookup(self, key: Hashable) -> int | None:
        return self.index.get(key)

    def acquire(self, slot: int) -> bool:
        """Hold a ready slot for one sequence; True when that counts as a cache hit (not the slot's first
        use after being loaded for a waiting request)."""
        s = self.slots[slot]
        s.refs += 1
        self.clock += 1
        s.last_used = self.clock
        hit, s.fresh = not s.fresh, False
        return hit

    def release(self, slot: int) -> None:
        s = self.slots[slot]
        s.refs -= 1
        if s.refs == 0 and s.drop_when_idle and not s.pinned:
            self._free(slot)

    def set_pinned(self, slot: int, pinned: bool) -> None:
        self.slots[slot].pinned = pinned

    def pinned_rows(self, also: int | None = None) -> int:
        """Pool rows held by pinned slots (and by slot `also`)."""
        return sum(s.rank for i, s in enumerate(self.slots) if s is not None and (s.pinned or i == also))

    def batch_rank(self, slots: Iterable[int]) -> int:
        """The largest per-module rank among these ready slots (negative ids: no adapter); 0 for none."""
        return max((self.slot_rank[s] for s in slots if s >= 0), default=0)

    def num_ready(self) -> int:
        return sum(s is not None and s.ready for s in self.slots)

    def num_held(self) -> int:
        """Slots holding an adapter or a mix, loaded or still loading."""
        return sum(s is not None for s in self.slots)

    # --- loading -----------------------------------------------------------------------------------

    def largest_unpinned_run(self, also: int | None = None) -> int:
        """The longest run of consecutive pool rows that no pinned slot (nor slot `also`) holds: the largest rank
        that can always load once the unpinned slots are idle and evicted."""
        held = sorted((s.row_start, s.rank) for i, s in enumerate(self.slots)
                      if s is not None and (s.pinned or i == also))
        best, end = 0, 0
        for start, rank in held:
            best, end = max(best, start - end), max(end, start + rank)
        return max(best, self.pool_rows - end)

    def reserve(self, key: Hashable, adapter: StagedAdapter | StagedMix, high: bool = False) -> int | None:
        """Take a slot and rows for `adapter` (evicting idle ones, least recently used first) and start
        copying it in; `poll(slot)` says when it is usable. None when every slot or row is held by
        running, pinned or still-loading adapters. high: rows from the top of the pool (RowAllocator)."""
        rank, scale, ranks = _layout(adapter)
        if rank > self.pool_rows:  # the request fails, not the step (EngineConfig keeps max_lora_rank within)
            raise AdapterError(f"rank {rank} does not fit a pool of {self.pool_rows} rows")
        while True:
            slot = self.slots.index(None) if None in self.slots else None
            start = self.rows.alloc(rank, high) if slot is not None else None
            if start is not None:
                break
            if not self._evict_one():
                return None
        s = Slot(key=key, row_start=start, rank=rank, scale=scale, ready=False, fresh=True, ranks=ranks,
                 started=time.perf_counter())
        after = None
        if self._cuda:  # the copy waits for the steps already queued, which may still read freed rows
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.device))
        if self.copy_thread:
            s.transfer = self._copier.submit(self._copy_locked, key, start, adapter, after)
        else:
            s.transfer = Future()
            self._queued.append(_Job(s.transfer, key, start, adapter, after))
        self.slots[slot] = s
        self.index[key] = slot
        return slot

    def poll(self, slot: int) -> bool:
        """True once the slot's weights are on the device and its table entries are written.

        Raises what the copy raised (the slot is freed first)."""
        s = self.slots[slot]
        if s.ready:
            return True
        if not s.transfer.done():
            return False
        try:
            copied = s.transfer.result()
        except BaseException:
            self._free(slot)
            raise
        if copied.done is not None:
            if not copied.done.query():
                return False
            self.stats.record("h2d_copy", copied.begin.elapsed_time(copied.done) / 1000)
        if copied.finite is not None and not bool(copied.finite):
            self._free(slot)
            raise AdapterError("the adapter's weights contain NaN or infinite values")
        try:
            self._publish(slot)
        except Exception as exc:  # e.g. a scale past float32's range: never leave the slot reserved and unready
            self._free(slot)
            raise AdapterError(f"the adapter's slot tables could not be written: {exc}") from exc
        return True

    def load(self, key: Hashable, adapter: StagedAdapter | StagedMix, high: bool = False) -> int | None:
        """reserve + wait for the copy (admin pin: its caller waits anyway). None as for reserve; raises what
        the copy raised (the slot is freed first)."""
        slot = self.reserve(key, adapter, high)
        if slot is None:
            return None
        self.issue_pending()
        transfer = self.slots[slot].transfer
        if transfer.exception() is None and transfer.result().done is not None:
            transfer.result().done.synchronize()
        self.poll(slot)
        self.slots[slot].fresh = False
        return slot

    def pending(self) -> list[Future]:
        return [s.transfer for s in self.slots if s is not None and not s.ready]

    def issue_pending(self, wait: bool = True) -> int:
        """Issue the copies reserved since the last call, in order, on this thread (the engine's); how many.

        Who calls it: the runner right after each step's launch (wait=False: if copy_lock is busy, with a
        graph capture or a reading thread allocating pinned memory, which can take tens of ms, the copies wait
        for the next launch rather than stall this one); the engine when a step has nothing to launch and
        before it idles; `load`. A caller of reserve outside an engine (a benchmark, a test) calls it itself.
        An exception in a copy goes to its future: `poll` frees the slot and raises it, as for the copy
        thread."""
        if not self._queued or not self.copy_lock.acquire(blocking=wait):
            return 0
        try:
            jobs, self._queued = self._queued, []
            for job in jobs:
                if not job.future.set_running_or_notify_cancel():
                    continue
                try:
                    self._hook(job.key)
                    job.future.set_result(self._copy(job.start, job.adapter, job.after))
                except Exception as exc:
                    job.future.set_exception(exc)
        finally:
            self.copy_lock.release()
        return len(jobs)

    def _copy_locked(self, key: Hashable, start: int, adapter: StagedAdapter | StagedMix,
                     after: torch.cuda.Event | None) -> _Copied:
        """On the copy thread: the hook, then _copy (under copy_lock on CUDA)."""
        self._hook(key)
        with self.copy_lock if self._cuda else contextlib.nullcontext():
            return self._copy(start, adapter, after)

    def _hook(self, key: Hashable) -> None:
        if self.copy_hook is not None:
            self.copy_hook(key)

    def _copy(self, start: int, adapter: StagedAdapter | StagedMix, after: torch.cuda.Event | None) -> _Copied:
        """With copy_lock held on CUDA: CPU pools are written here; on CUDA everything is queued on the side
        stream behind `after`, and poll() waits for the returned events."""
        t0 = time.perf_counter()
        if not self._cuda:
            finite = self.writer.write(start, adapter, to_device=False)
            self.stats.record("h2d_copy", time.perf_counter() - t0)
            return _Copied(None, None, finite)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            self._stream.wait_event(after)
            begin, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(self._stream)
            finite = self.writer.write(start, adapter, to_device=True)
            if finite is not None:  # read by poll() once `done` completed: no sync on the engine thread
                finite = finite.to("cpu", non_blocking=True)
            done.record(self._stream)
        self.stats.record("h2d_issue", time.perf_counter() - t0)
        return _Copied(begin, done, finite)

    def _publish(self, slot: int) -> None:
        """The slot-table writes that make a copied slot visible to the kernels."""
        t0 = time.perf_counter()
        s = self.slots[slot]
        for m in TARGET_MODULES:
            self.ranks[m][slot] = s.ranks.get(m, 0)
        self.row_start[slot] = s.row_start
        self.scale[slot] = s.scale
        self.slot_rank[slot] = max(s.ranks.values(), default=0)
        s.ready, s.transfer = True, None
        now = time.perf_counter()
        self.stats.record("slot_tables", now - t0)
        self.stats.observe("cpu_to_gpu", now - s.started)

    # --- eviction ----------------------------------------------------------------------------------

    def evict(self, key: Hashable) -> bool:
        """Drop `key` if it is resident, idle and not being copied in; True when it is gone."""
        slot = self.index.get(key)
        if slot is None:
            return True
        s = self.slots[slot]
        if s.refs or s.pinned or not s.ready:
            return False
        self._free(slot)
        return True

    def unload(self, key: Hashable) -> bool:
        """Unpin `key` and free its slot now if idle, else when its last user releases it. True if freed."""
        slot = self.index.get(key)
        if slot is None:
            return True
        s = self.slots[slot]
        s.pinned = False
        if self.evict(key):
            return True
        s.drop_when_idle = True
        return False

    def _evict_one(self) -> bool:
        idle = [i for i, s in enumerate(self.slots) if s is not None and not s.refs and not s.pinned and s.ready]
        if not idle:
            return False
        victim = min(idle, key=lambda i: self.slots[i].last_used)
        key = self.slots[victim].key
        self.evictions[key] = self.evictions.get(key, 0) + 1
        self._free(victim)
        return True

    def _free(self, slot: int) -> None:
        s = self.slots[slot]
        for m in TARGET_MODULES:
            self.ranks[m][slot] = 0
        self.slot_rank[slot] = 0
        self.rows.release(s.row_start, s.rank)
        del self.index[s.key]
        self.slots[slot] = None

    def close(self) -> None:
        self._copier.shutdown(wait=False, cancel_futures=True)
        for job in self._queued:
            job.future.cancel()
        self._queued.clear()


def _layout(adapter: StagedAdapter | StagedMix) -> tuple[int, float, dict[str, int]]:
    """(rows the slot takes, its scale, rows per module) of an adapter or a mix."""
    if isinstance(adapter, StagedMix):
        return adapter.rank, adapter.scale, adapter.ranks
    cfg = adapter.config
    return cfg.rank, cfg.scale, {m: cfg.rank if m in cfg.target_modules else 0 for m in TARGET_MODULES}

