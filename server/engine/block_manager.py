"""Paged KV-cache allocation: fixed-size blocks with reference counts."""

from __future__ import annotations

from collections import deque

from hotlora.server.engine.sequence import Sequence


class BlockManager:
    """Hands out KV blocks of `block_size` token slots each.

    Blocks are ref-counted so that a block can be shared (forked sequences, prefix reuse); a block
    returns to the free list when its count drops to zero.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold its first `num_tokens` tokens."""
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to hold `num_tokens` tokens."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {need}, have {self.num_free}")
        for _ in range(need):
            block = self.free.popleft()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share the parent's blocks with the child (copy-on-write is the caller's concern)."""
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)

    def release(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free.append(block)
        seq.block_table = []
