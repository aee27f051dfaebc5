"""Device residency of adapters: per-layer row pools, slot tables, LRU eviction and pinning.

The pools follow the row-pool layout of hotlora.kernels (see kernels/_meta.py): an adapter of rank r
takes exactly r consecutive rows of every target module's pool, in every layer, so slots of small
rank leave room for more adapters and no kernel ever computes padding.

Loading a slot never blocks the engine thread on the copy: `reserve` takes the rows and hands the copy
to a worker thread, which on CUDA issues it on a side stream (after an event recorded on the engine's
stream, so rows freed by an eviction are not overwritten under a step still in flight) and returns an
event; `poll` checks that event and only then writes the slot-table entries (rank, row start, scale)
that make the slot visible to the kernels. A host copy read from disk is the raw file in one buffer
(adapters/staging.py; pinned on CUDA): the copy thread moves it to the device in one transfer, then
casts and transposes into the pool rows and checks finiteness there, all queued on the side stream.
A weighted mix (adapters/compose.py) takes one slot of its summed rank; its copy writes each
component's rows in turn, with the component's weight and scale folded into A.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from hotlora.adapters.compose import StagedMix, fold
from hotlora.adapters.loadstats import LoadStats
from hotlora.adapters.peft_format import TARGET_MODULES, AdapterError
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
class _Copied:
    """What the copy thread hands back: CUDA events to poll (None on CPU), and a host flag that says
    whether every weight was finite (None when not checked), valid once `done` has completed."""

    begin: torch.cuda.Event | None
    done: torch.cuda.Event | None
    finite: torch.Tensor | None


class RowAllocator:
    """First-fit allocation of consecutive pool rows, with neighbouring free ranges merged."""

    def __init__(self, rows: int) -> None:
        self.free: list[tuple[int, int]] = [(0, rows)]  # (start, length), sorted by start

    def alloc(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self.free):
            if length >= n:
                self.free[i] = (start + n, length - n)
                if length == n:
                    del self.free[i]
                return start
        return None

    def release(self, start: int, n: int) -> None:
        self.free.append((start, n))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for s, length in self.free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        self.free = merged


class LoraSlotCache:
    """`num_slots` device slots over pools of `pool_rows` rows per (layer, module).

    Only the engine thread calls it; the copies it starts run on its copy thread.
    `copy_hook(key)`, when set, runs on the copy thread before each copy: fault injection for tests.
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
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-h2d")
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

    def batch_rank(self, slots: Iterable[int]) -> int:
        """The largest per-module rank among these ready slots (negative ids: no adapter); 0 for none."""
        return max((self.slot_rank[s] for s in slots if s >= 0), default=0)

    def num_ready(self) -> int:
        return sum(s is not None and s.ready for s in self.slots)

    # --- loading -----------------------------------------------------------------------------------

    def reserve(self, key: Hashable, adapter: StagedAdapter | StagedMix) -> int | None:
        """Take a slot and rows for `adapter` (evicting idle ones, least recently used first) and start
        copying it in; `poll(slot)` says when it is usable. None when every slot or row is held by
        running, pinned or still-loading adapters."""
        rank, scale, ranks = _layout(adapter)
        if rank > self.pool_rows:
            raise ValueError(f"rank {rank} does not fit a pool of {self.pool_rows} rows")
        while True:
            slot = self.slots.index(None) if None in self.slots else None
            start = self.rows.alloc(rank) if slot is not None else None
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
        s.transfer = self._copier.submit(self._copy, key, start, adapter, after)
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
        self._publish(slot)
        return True

    def load(self, key: Hashable, adapter: StagedAdapter | StagedMix) -> int | None:
        """reserve + wait for the copy (admin pin: its caller waits anyway). None as for reserve."""
        slot = self.reserve(key, adapter)
        if slot is None:
            return None
        copied = self.slots[slot].transfer.result()
        if copied.done is not None:
            copied.done.synchronize()
        self.poll(slot)
        self.slots[slot].fresh = False
        return slot

    def pending(self) -> list[Future]:
        return [s.transfer for s in self.slots if s is not None and not s.ready]

    def _copy(self, key: Hashable, start: int, adapter: StagedAdapter | StagedMix,
              after: torch.cuda.Event | None) -> _Copied:
        """On the copy thread: CPU pools are written here; on CUDA everything is queued on the side stream
        behind `after`, and poll() waits for the returned events."""
        if self.copy_hook is not None:
            self.copy_hook(key)
        t0 = time.perf_counter()
        if not self._cuda:
            finite = self._write_staged(start, adapter, to_device=False)
            self.stats.record("h2d_copy", time.perf_counter() - t0)
            return _Copied(None, None, finite)
        with self.copy_lock, torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            self._stream.wait_event(after)
            begin, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(self._stream)
            finite = self._write_staged(start, adapter, to_device=True)
            if finite is not None:  # read by poll() once `done` completed: no sync on the engine thread
                finite = finite.to("cpu", non_blocking=True)
            done.record(self._stream)
        self.stats.record("h2d_issue", time.perf_counter() - t0)
        return _Copied(begin, done, finite)

    def _write_staged(self, start: int, adapter: StagedAdapter | StagedMix, to_device: bool) -> torch.Tensor | None:
        """Copy an adapter, or each component of a mix at its row offset per module, into the pool rows;
        the finiteness flag if it is still to check. `to_device`: move each file to the device first."""
        if not isinstance(adapter, StagedMix):
            return self._write(start, adapter, self._raw(adapter, to_device))
        offsets = dict.fromkeys(TARGET_MODULES, 0)
        flags = []
        for part, weight in adapter.parts:
            flag = self._write(start, part, self._raw(part, to_device), offsets, weight)
            if flag is not None:
                flags.append(flag)
            for m in part.config.target_modules:
                offsets[m] += part.config.rank
        return torch.stack(flags).all() if flags else None

    def _raw(self, adapter: StagedAdapter, to_device: bool) -> torch.Tensor | None:
        """The file's bytes where the copies read from: a device copy of them on CUDA."""
        if not to_device or adapter.raw is None:
            return adapter.raw
        return adapter.raw.to(self.device, non_blocking=True)

    def _write(self, start: int, adapter: StagedAdapter, raw: torch.Tensor | None,
               offsets: dict[str, int] | None = None, weight: float | None = None) -> torch.Tensor | None:
        """Copy (casting, B transposed) into the pool rows from `start` (+ offsets[module] for a mix
        component, whose A is folded with `weight` and its scale); the finiteness flag if still to check."""
        weights = adapter.weights if raw is None or raw is adapter.raw else adapter.views(raw)
        for m in adapter.config.target_modules:
            first = start + (offsets[m] if offsets is not None else 0)
            rows = slice(first, first + adapter.config.rank)
            pairs = [weights.get((layer, m)) for layer in range(len(self.layers))]
            if weight is not None:
                pairs = [None if ab is None else (fold(ab[0], weight, adapter.config.scale), ab[1]) for ab in pairs]
            pool_a, pool_b = self.pools[m]
            if all(ab is not None for ab in pairs):
                # a few large ops, not two per layer: each op waits for the GIL, which the engine and
                # HTTP threads hold most of the time under load (448 small copies took ~0.6 s there)
                pool_a[:, rows].copy_(torch.stack([a for a, _ in pairs]), non_blocking=True)
                pool_b[:, rows].copy_(torch.stack([b for _, b in pairs]).transpose(1, 2), non_blocking=True)
                continue
            for layer, ab in enumerate(pairs):
                if ab is None:  # not targeted in this layer (layers_to_transform): a zero delta
                    pool_a[layer, rows].zero_()
                    pool_b[layer, rows].zero_()
                else:
                    pool_a[layer, rows].copy_(ab[0], non_blocking=True)
                    pool_b[layer, rows].copy_(ab[1].T, non_blocking=True)
        if not adapter.check_finite:
            return None
        return _all_finite(adapter, raw, weights)

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


def _layout(adapter: StagedAdapter | StagedMix) -> tuple[int, float, dict[str, int]]:
    """(rows the slot takes, its scale, rows per module) of an adapter or a mix."""
    if isinstance(adapter, StagedMix):
        return adapter.rank, adapter.scale, adapter.ranks
    cfg = adapter.config
    return cfg.rank, cfg.scale, {m: cfg.rank if m in cfg.target_modules else 0 for m in TARGET_MODULES}


def _all_finite(adapter: StagedAdapter, raw: torch.Tensor, weights: dict) -> torch.Tensor:
    """One kernel over the file's data when it is all one dtype (as peft saves it), else one per tensor."""
    dtypes = {t.dtype for ab in weights.values() for t in ab}
    data = raw[adapter.data_start :]
    if len(dtypes) == 1:
        (dtype,) = dtypes
        if adapter.data_start % dtype.itemsize == 0 and data.numel() % dtype.itemsize == 0:
            return torch.isfinite(data.view(dtype)).all()
    return torch.stack([torch.isfinite(t).all() for ab in weights.values() for t in ab]).all()
