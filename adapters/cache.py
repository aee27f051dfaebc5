"""Device residency of adapters: per-layer row pools, slot tables, LRU eviction and pinning.

The pools follow the row-pool layout of hotlora.kernels (see kernels/_meta.py): an adapter of rank r
takes exactly r consecutive rows of every target module's pool, in every layer, so slots of small
rank leave room for more adapters and no kernel ever computes padding.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from hotlora.adapters.peft_format import TARGET_MODULES, LoraAdapter
from hotlora.kernels.lora import LoraSlice


@dataclass(slots=True)
class Slot:
    key: Hashable  # whose weights the slot holds (the registry's version handle)
    row_start: int
    rank: int
    refs: int = 0  # running sequences using it: never evicted while > 0
    pinned: bool = False
    last_used: int = 0


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
    """`num_slots` device slots over pools of `pool_rows` rows per (layer, module)."""

    def __init__(self, linear_shapes: dict[str, tuple[int, int]], num_layers: int, num_slots: int,
                 pool_rows: int, device: torch.device, dtype: torch.dtype) -> None:
        self.num_slots, self.pool_rows = num_slots, pool_rows
        self.row_start = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.scale = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.ranks = {m: torch.zeros(num_slots, dtype=torch.int32, device=device) for m in TARGET_MODULES}
        self.layers: list[dict[str, LoraSlice]] = [
            {
                m: LoraSlice(
                    a=torch.zeros(pool_rows, linear_shapes[m][1], device=device, dtype=dtype),
                    b=torch.zeros(pool_rows, linear_shapes[m][0], device=device, dtype=dtype),
                    rank=self.ranks[m],
                )
                for m in TARGET_MODULES
            }
            for _ in range(num_layers)
        ]
        self.slots: list[Slot | None] = [None] * num_slots
        self.index: dict[Hashable, int] = {}
        self.rows = RowAllocator(pool_rows)
        self.clock = 0
        self.evictions: dict[Hashable, int] = {}

    def lookup(self, key: Hashable) -> int | None:
        return self.index.get(key)

    def acquire(self, slot: int) -> None:
        s = self.slots[slot]
        s.refs += 1
        self.clock += 1
        s.last_used = self.clock

    def release(self, slot: int) -> None:
        self.slots[slot].refs -= 1

    def set_pinned(self, slot: int, pinned: bool) -> None:
        self.slots[slot].pinned = pinned

    def load(self, key: Hashable, adapter: LoraAdapter) -> int | None:
        """Copy `adapter` into a slot, evicting idle ones (least recently used first) to make room.

        Returns the slot, or None when every slot or row is held by running or pinned adapters.
        """
        rank = adapter.config.rank
        if rank > self.pool_rows:
            raise ValueError(f"rank {rank} does not fit a pool of {self.pool_rows} rows")
        while True:
            slot = self.slots.index(None) if None in self.slots else None
            start = self.rows.alloc(rank) if slot is not None else None
            if start is not None:
                break
            if not self._evict_one():
                return None
        self._write(slot, start, adapter)
        self.slots[slot] = Slot(key=key, row_start=start, rank=rank)
        self.index[key] = slot
        return slot

    def evict(self, key: Hashable) -> bool:
        """Drop `key` if it is resident and idle; True when it is gone."""
        slot = self.index.get(key)
        if slot is None:
            return True
        if self.slots[slot].refs or self.slots[slot].pinned:
            return False
        self._free(slot)
        return True

    def _evict_one(self) -> bool:
        idle = [i for i, s in enumerate(self.slots) if s is not None and not s.refs and not s.pinned]
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
        self.rows.release(s.row_start, s.rank)
        del self.index[s.key]
        self.slots[slot] = None

    def _write(self, slot: int, start: int, adapter: LoraAdapter) -> None:
        rank = adapter.config.rank
        rows = slice(start, start + rank)
        for m in TARGET_MODULES:
            targeted = m in adapter.config.target_modules
            self.ranks[m][slot] = rank if targeted else 0
            if not targeted:
                continue
            for layer, slices in enumerate(self.layers):
                ab = adapter.weights.get((layer, m))
                if ab is None:  # not targeted in this layer (layers_to_transform): a zero delta
                    slices[m].a[rows].zero_()
                    slices[m].b[rows].zero_()
                else:
                    slices[m].a[rows].copy_(ab[0])
                    slices[m].b[rows].copy_(ab[1].T)
        self.row_start[slot] = start
        self.scale[slot] = adapter.config.scale
