"""The prefix cache inside the block manager and the scheduler, without a model (pure Python)."""

from __future__ import annotations

import pytest

from hotlora.server.engine.block_manager import BlockManager, block_key
from hotlora.server.engine.scheduler import Scheduler
from hotlora.server.engine.sequence import Sequence
from hotlora.server.engine.types import SamplingParams

BS = 4


def _seq(name: str, tokens: list[int], ns: int | None = None) -> Sequence:
    seq = Sequence(name, list(tokens), SamplingParams(max_tokens=4))
    seq.cache_ns = ns
    return seq


def _run(bm: BlockManager, seq: Sequence) -> list[int]:
    """Admit `seq` with whatever the cache has, 'compute' all its tokens, and register its blocks.
    Returns the blocks it mapped from the cache."""
    prefix = bm.match(seq)
    bm.start(seq, prefix, len(seq))
    seq.num_computed = len(seq)
    bm.commit(seq)
    return prefix


def test_block_key_separates_parent_tokens_and_namespace():
    base = block_key(None, [1, 2, 3, 4], None)
    assert base == block_key(None, [1, 2, 3, 4], None) and len(base) == 32
    others = [
        block_key(None, [1, 2, 3, 5], None),
        block_key(base, [1, 2, 3, 4], None),  # same tokens one block later
        block_key(None, [1, 2, 3, 4], 0),  # version 0 is not the base model
        block_key(None, [1, 2, 3, 4], 1),
        block_key(None, [1, 2, 3, 4], 2),
    ]
    assert len({base, *others}) == 1 + len(others)


def test_full_computed_blocks_are_reused_and_the_rest_computed():
    bm = BlockManager(16, BS)
    a = _seq("a", range(1, 11))  # 10 tokens: two full blocks and a partial one
    assert _run(bm, a) == [] and len(bm.cached) == 2
    held = list(a.block_table)
    bm.release(a)
    bm.check_idle()
    assert len(bm.cached_free) == 2 and len(bm.free) == 14  # the partial block holds nothing reusable
    b = _seq("b", [*range(1, 9), 99, 98, 97])  # shares the first two blocks only
    prefix = bm.match(b)
    assert prefix == held[:2]
    bm.start(b, prefix, len(b))
    assert b.num_computed == 8 and b.block_table[:2] == prefix and len(b.block_table) == 3
    assert b.num_cached_tokens == 8 and (bm.queries, bm.hits) == (10 + 11, 8)
    assert not bm.cached_free and all(bm.ref_counts[x] == 1 for x in b.block_table)
    bm.release(b)
    bm.check_idle()


def test_last_token_is_always_computed_even_when_fully_cached():
    bm = BlockManager(8, BS)
    a = _seq("a", range(1, 9))  # exactly two blocks
    _run(bm, a)
    bm.release(a)
    again = _seq("again", range(1, 9))
    prefix = bm.match(again)
    assert len(prefix) == 1  # the second block holds the last token: recomputed into a block of its own
    bm.start(again, prefix, len(again))
    assert again.num_computed == 4 and again.block_table[1] not in bm.cached.values()
    bm.release(again)
    bm.check_idle()


def test_namespaces_never_share_blocks():
    bm = BlockManager(32, BS)
    tokens = list(range(1, 14))
    owners = [_seq("base", tokens), _seq("v1", tokens, 1), _seq("v2", tokens, 2)]
    for seq in owners:
        assert _run(bm, seq) == []  # nobody else's blocks, though the tokens are equal
    blocks = [set(s.block_table) for s in owners]
    assert not (blocks[0] & blocks[1] or blocks[0] & blocks[2] or blocks[1] & blocks[2])
    for seq in owners:
        bm.release(seq)
    assert len(bm.cached) == 9
    hit = _seq("v2 again", tokens, 2)
    assert bm.match(hit) == [bm.cached[k] for k in owners[2].block_hashes[:3]]
    bm.check_idle()


def test_partial_and_uncomputed_blocks_are_not_registered():
    bm = BlockManager(8, BS)
    a = _seq("a", range(1, 12))
    bm.start(a, bm.match(a), len(a))
    a.num_computed = 6  # mid-prefill: block 1 is half written
    bm.commit(a)
    assert len(bm.cached) == 1 and a.num_committed_blocks == 1
    b = _seq("b", range(1, 12))
    assert bm.match(b) == a.block_table[:1]
    bm.release(a)  # an abort mid-prefill keeps only the full computed block
    assert len(bm.cached_free) == 1
    bm.check_idle()


def test_racing_sequences_keep_their_duplicates_private():
    bm = BlockManager(8, BS)
    a, b = _seq("a", range(1, 10)), _seq("b", range(1, 10))
    for seq in (a, b):  # both admitted before either computed anything: no hit for either
        bm.start(seq, bm.match(seq), len(seq))
    for seq in (a, b):
        seq.num_computed = len(seq)
        bm.commit(seq)
    assert set(bm.cached.values()) == set(a.block_table[:2]) and not set(b.block_table) & set(a.block_table)
    bm.release(a)
    bm.release(b)
    assert len(bm.cached_free) == 2 and len(bm.free) == 6
    bm.check_idle()


def test_eviction_takes_plain_free_blocks_first_then_least_recently_used():
    bm = BlockManager(6, BS)
    old, new = _seq("old", range(1, 10)), _seq("new", range(50, 59))
    _run(bm, old)
    _run(bm, new)
    bm.release(old)
    bm.release(new)
    assert len(bm.free) == 2 and len(bm.cached_free) == 4
    filler = _seq("filler", range(100, 113))  # needs 4 blocks: 2 plain, then the oldest cached ones
    bm.allocate(filler, len(filler))
    assert len(bm.cached) == 2 and bm.match(_seq("x", range(50, 59))) != []
    assert bm.match(_seq("y", range(1, 10))) == []
    bm.release(filler)
    bm.check_idle()


def test_can_allocate_counts_idle_cached_blocks_it_would_take():
    bm = BlockManager(3, BS)
    a = _seq("a", range(1, 10))
    _run(bm, a)
    bm.release(a)
    b = _seq("b", range(1, 12))  # maps 2 idle cached blocks (from the 3 free) and needs 1 more
    prefix = bm.match(b)
    assert len(prefix) == 2 and bm.can_allocate(b, 11, prefix) and not bm.can_allocate(b, 13, prefix)
    bm.start(b, prefix, 11)
    assert bm.num_free == 0
    bm.release(b)
    bm.check_idle()


def test_disabled_cache_reuses_nothing_and_counts_nothing():
    bm = BlockManager(8, BS, enable_caching=False)
    a = _seq("a", range(1, 10))
    _run(bm, a)
    bm.release(a)
    assert bm.match(_seq("b", range(1, 10))) == [] and not bm.cached and len(bm.free) == 8
    assert (bm.queries, bm.hits) == (0, 0)


def _drive(s: Scheduler) -> list[int]:
    """One step as the engine runs it (tokens computed, a token sampled at a prefill's end); the
    scheduled token counts."""
    batch = s.schedule()
    for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
        seq.num_computed += n
        if seq.num_computed == len(seq):
            seq.token_ids.append(7)
            if seq.num_generated >= seq.params.max_tokens:
                s.finish(seq)
    return batch.num_tokens


def _scheduler(blocks: int, budget: int) -> Scheduler:
    return Scheduler(BlockManager(blocks, BS), 8, budget, admit=lambda seq: True, release=lambda seq: None)


def test_scheduler_computes_only_the_uncached_rest():
    s = _scheduler(blocks=16, budget=64)
    s.add(_seq("first", range(1, 20)))
    assert _drive(s) == [19]
    s.add(_seq("second", [*range(1, 17), 40, 41, 42]))  # four blocks in common with the running one
    assert _drive(s) == [1, 3]
    while s.has_unfinished():
        _drive(s)
    s.blocks.check_idle()
    assert (s.blocks.queries, s.blocks.hits) == (38, 16)


@pytest.mark.parametrize("budget", [5, 64])
def test_scheduler_preemption_keeps_refcounts(budget):
    # three 8-token prompts sharing their first block grow to 16 tokens: 12 blocks at most, 7 there
    s = _scheduler(blocks=7, budget=budget)
    for i in range(3):
        seq = _seq(f"s{i}", [1, 2, 3, 4, *range(10 * i + 20, 10 * i + 24)])
        seq.params.max_tokens = 8
        s.add(seq)
    for _ in range(200):
        if not s.has_unfinished():
            break
        _drive(s)
        held = [b for seq in s.running for b in seq.block_table]
        assert all(s.blocks.ref_counts[b] == held.count(b) for b in range(s.blocks.num_blocks))
    assert not s.has_unfinished() and s.num_preemptions > 0
    s.blocks.check_idle()
