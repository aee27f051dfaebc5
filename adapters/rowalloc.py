"""Consecutive rows of the LoRA pools (adapters.cache): which ranges are free."""

from __future__ import annotations


class RowAllocator:
    """First-fit allocation of consecutive pool rows, with neighbouring free ranges merged; `high` allocates
    from the top instead (last fit, the range's last rows: where pinned adapters go, see LoraSlotCache)."""

    def __init__(self, rows: int) -> None:
        self.free: list[tuple[int, int]] = [(0, rows)]  # (start, length), sorted by start

    def alloc(self, n: int, high: bool = False) -> int | None:
        order = range(len(self.free) - 1, -1, -1) if high else range(len(self.free))
        for i in order:
            start, length = self.free[i]
            if length >= n:
                first = start + length - n if high else start
                self.free[i] = (start, length - n) if high else (start + n, length - n)
                if length == n:
                    del self.free[i]
                return first
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
