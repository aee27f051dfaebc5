"""Paged KV-cache allocation: fixed-size blocks with reference counts, and automatic prefix caching.

Prefix caching. Once every token slot of a block holds computed KV, the block is registered under a
key that chains the previous block's key, the block's token ids and the sequence's cache namespace
(None for the base model, else the adapter version id the registry assigned). Equal keys mean equal
KV: same tokens at the same positions after the same prefix, through the same weights. A new
sequence maps its longest registered run of whole blocks and computes only the rest.

Invariants (checked by the tests after every scenario):
- a block is in exactly one of: held (ref_count > 0), `free` (nothing reusable), `cached_free`
  (ref_count 0 but registered: reusable KV, evicted least recently used first when `free` is empty);
- only full, computed blocks are registered, so a shared block is never written again. A sequence
  maps at most (len - 1) // block_size cached blocks: its last token is always computed (the sampler
  needs its logits), and that token's block is its own.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from hotlora.server.engine.sequence import Sequence

_ROOT = bytes(32)  # the "previous key" of a sequence's first block


def block_key(parent: bytes | None, tokens: list[int], namespace: int | None) -> bytes:
    """sha256 over (parent key, namespace, token ids), each field fixed-width so no two inputs
    serialize alike. The namespace is the registry's version id, never a user-chosen string."""
    h = hashlib.sha256(parent or _ROOT)
    h.update(b"\x00" + bytes(8) if namespace is None else b"\x01" + namespace.to_bytes(8, "little", signed=True))
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    """Hands out KV blocks of `block_size` token slots each.

    Blocks are ref-counted so that a block can be shared (forked sequences, prefix reuse).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self.cached: dict[bytes, int] = {}  # key -> the one block registered under it
        self.queries = 0  # tokens of sequences that looked up the cache (first admission only)
        self.hits = 0  # of those, tokens served from the cache

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, seq: Sequence, num_tokens: int, prefix: list[int] | None = None) -> int:
        """Extra blocks `seq` needs to hold its first `num_tokens` tokens (after mapping `prefix`)."""
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(seq.block_table) - len(prefix or ()))

    def can_allocate(self, seq: Sequence, num_tokens: int, prefix: list[int] | None = None) -> bool:
        # mapping a cached block nobody holds takes it out of the free supply too
        idle = sum(1 for b in prefix or () if self.ref_counts[b] == 0)
        return self.blocks_needed(seq, num_tokens, prefix) + idle <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to hold `num_tokens` tokens."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {need}, have {self.num_free}")
        for _ in range(need):
            block = self._take()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def _take(self) -> int:
        if self.free:
            return self.free.popleft()
        block, _ = self.cached_free.popitem(last=False)  # evict the least recently used cached block
        del self.cached[self.block_hash[block]]
        self.block_hash[block] = None
        return block

    # --- prefix caching ---------------------------------------------------------------------------

    def match(self, seq: Sequence) -> list[int]:
        """The cached blocks of `seq`'s longest registered prefix (no references taken)."""
        if not self.enable_caching or seq.block_table or seq.scoring_prompt:
            return []  # (a prompt whose logprobs are asked for is computed in full: cached KV has no logits)
        limit = (len(seq) - 1) // self.block_size
        hashes = self._hashes(seq, limit)
        found = []
        for key in hashes[:limit]:
            block = self.cached.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def start(self, seq: Sequence, prefix: list[int], num_tokens: int) -> None:
        """Admit `seq` (new, or back after a preemption): map `prefix` (from match), mark those tokens
        computed, then grow to `num_tokens`."""
        assert not seq.block_table and seq.num_computed == 0, "start() is for a sequence holding nothing"
        for block in prefix:
            if self.ref_counts[block] == 0:
                del self.cached_free[block]
            self.ref_counts[block] += 1
        seq.block_table = list(prefix)
        seq.num_committed_blocks = len(prefix)
        seq.num_computed = len(prefix) * self.block_size
        if self.enable_caching and not seq.prefix_queried and not seq.scoring_prompt:  # match() skipped those
            seq.prefix_queried = True
            seq.num_cached_tokens = seq.num_computed
            self.queries += len(seq)
            self.hits += seq.num_computed
        self.allocate(seq, num_tokens)

    def commit(self, seq: Sequence) -> None:
        """Register `seq`'s blocks that became full and computed (the scheduler calls this for every
        running sequence before it schedules the next step, and release() before dropping them)."""
        full = seq.num_computed // self.block_size
        if not self.enable_caching or full <= seq.num_committed_blocks:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_committed_blocks, full):
            block, key = seq.block_table[i], hashes[i]
            # a sequence that raced another to the same prefix keeps its duplicate block unregistered
            if self.block_hash[block] is None and key not in self.cached:
                self.block_hash[block] = key
                self.cached[key] = block
        seq.num_committed_blocks = full

    def _hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The chain keys of `seq`'s first `count` full blocks (kept on the sequence: tokens only grow)."""
        keys, bs = seq.block_hashes, self.block_size
        for i in range(len(keys), count):
            keys.append(block_key(keys[-1] if keys else None, seq.token_ids[i * bs : (i + 1) * bs], seq.cache_ns))
        return keys

    # --- sharing and release ----------------------------------------------------------------------

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share the parent's blocks with the child (copy-on-write is the caller's concern)."""
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)
        child.num_committed_blocks = parent.num_committed_blocks

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s blocks; the full computed ones stay reusable in the cached free list."""
        self.commit(seq)
        # tail blocks first: they are evicted first, and a prefix is useless without its head
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is None:
                    self.free.append(block)
                else:
                    self.cached_free[block] = None
        seq.block_table = []
        seq.num_committed_blocks = 0

    def check_idle(self) -> None:
        """Raise AssertionError unless no block is held and every block is free or cached-free."""
        assert all(c == 0 for c in self.ref_counts), "a block is still referenced"
        assert self.num_free == self.num_blocks, f"{self.num_used} blocks leaked"
        assert set(self.free).isdisjoint(self.cached_free), "a block is both free and cached-free"
        assert all(self.block_hash[b] is not None for b in self.cached_free)
        assert {b: k for k, b in self.cached.items()} == {b: self.block_hash[b] for b in self.cached_free}
