"""Triton kernel of the per-step LoRA metadata (one program, one launch); semantics in _meta.py.

Counting sort of the tokens by slot: pass 1 counts tokens per slot, pass 2 scatters each token to
bounds[key] + (earlier tokens with its key), pass 3 cuts every slot's run into tiles of BLOCK_M.
Work per pass is [BLOCK_T, S_PAD] one-hot compares, so it suits up to a few hundred slots.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _interp_compat

_interp_compat.install()


@triton.jit
def _keys(slots_ptr, offs, T, S, S_PAD: tl.constexpr):
    """Sort key per token: its slot, S for no adapter (or an out-of-range slot), S_PAD past the end."""
    key = tl.load(slots_ptr + offs, mask=offs < T, other=-1)
    key = tl.where((key < 0) | (key >= S), S, key)
    return tl.where(offs < T, key, S_PAD)


@triton.jit
def lora_meta_kernel(
    slots_ptr, row_start_ptr, sorted_ptr, pos_ptr, bounds_ptr, info_ptr,
    T, S, max_tiles,
    S_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    sidx = tl.arange(0, S_PAD)
    counts = tl.zeros((S_PAD,), dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        key = _keys(slots_ptr, t0 + tl.arange(0, BLOCK_T), T, S, S_PAD)
        counts += tl.sum((key[:, None] == sidx[None, :]).to(tl.int32), axis=0)
    incl = tl.cumsum(counts, axis=0)
    excl = incl - counts
    tl.store(bounds_ptr + sidx, excl, mask=sidx <= S)
    nxt = excl
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        onehot = (_keys(slots_ptr, offs, T, S, S_PAD)[:, None] == sidx[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - onehot  # earlier tokens of this block with the same key
        pos = tl.sum((before + nxt[None, :]) * onehot, axis=1)
        tl.store(sorted_ptr + pos, offs, mask=offs < T)
        tl.store(pos_ptr + offs, pos, mask=offs < T)
        nxt += tl.sum(onehot, axis=0)
    ntiles = tl.where(sidx < S, (counts + BLOCK_M - 1) // BLOCK_M, 0)
    tile_end = tl.cumsum(ntiles, axis=0)
    tile_first = tile_end - ntiles
    for j0 in range(0, max_tiles, BLOCK_T):
        j = j0 + tl.arange(0, BLOCK_T)
        slot = tl.sum((tile_end[None, :] <= j[:, None]).to(tl.int32), axis=1)  # searchsorted(right)
        valid = slot < S
        sel = (sidx[None, :] == slot[:, None]).to(tl.int32)
        start = tl.sum(sel * excl[None, :], axis=1) + (j - tl.sum(sel * tile_first[None, :], axis=1)) * BLOCK_M
        end = tl.minimum(start + BLOCK_M, tl.sum(sel * incl[None, :], axis=1))
        row0 = tl.load(row_start_ptr + slot, mask=valid, other=0)
        jm = j < max_tiles
        rec = info_ptr + j * 4
        tl.store(rec, tl.where(valid, slot, -1), mask=jm)
        tl.store(rec + 1, tl.where(valid, start, 0), mask=jm)
        tl.store(rec + 2, tl.where(valid, end, 0), mask=jm)
        tl.store(rec + 3, tl.where(valid, row0, 0), mask=jm)
