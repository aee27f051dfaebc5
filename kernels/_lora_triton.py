"""Triton kernels of the LoRA gather-matmul (shrink and expand); wrappers and semantics in lora.py.

Grid of both kernels: axis 0 walks the tiles of ``LoraMeta`` (a tile = up to BLOCK_M tokens of one slot,
idle tiles exit at once), so every program reads the rows of exactly one adapter. Up to three slices
(q, k, v or gate, up) share a launch: the slice's pointers are picked per program.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _interp_compat

_interp_compat.install()


@triton.jit
def _tile_tokens(tile, tile_slot_ptr, tile_start_ptr, slot_bounds_ptr, sorted_ptr, BLOCK_M: tl.constexpr):
    """(slot, sorted positions, their mask, token indices) of one tile; slot < 0 for an idle tile."""
    slot = tl.load(tile_slot_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(slot_bounds_ptr + tl.maximum(slot, 0) + 1)
    pos = start + tl.arange(0, BLOCK_M)
    m_mask = pos < end
    tok = tl.load(sorted_ptr + pos, mask=m_mask, other=0).to(tl.int64)
    return slot, pos, m_mask, tok


@triton.jit
def lora_shrink_kernel(
    x_ptr, stride_xt,
    a0_ptr, a1_ptr, a2_ptr, stride_a0, stride_a1, stride_a2,
    rank0_ptr, rank1_ptr, rank2_ptr,
    ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos,
    sorted_ptr, slot_bounds_ptr, tile_slot_ptr, tile_start_ptr, row_start_ptr,
    K, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """ws[split, i, pos, :r] = x[tok] @ a_i[rows, k_range(split)].T, fp32; program = (tile, split, slice)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    sl = tl.program_id(2)
    slot, pos, m_mask, tok = _tile_tokens(tile, tile_slot_ptr, tile_start_ptr, slot_bounds_ptr, sorted_ptr, BLOCK_M)
    if slot < 0:
        return
    # pick the slice's tensors (an if-chain: Triton has no pointer arrays)
    if sl == 0:
        rank_ptr, a_ptr, stride_a = rank0_ptr, a0_ptr, stride_a0
    elif sl == 1:
        rank_ptr, a_ptr, stride_a = rank1_ptr, a1_ptr, stride_a1
    else:
        rank_ptr, a_ptr, stride_a = rank2_ptr, a2_ptr, stride_a2
    rank = tl.load(rank_ptr + slot)
    if rank == 0:
        return
    row0 = tl.load(row_start_ptr + slot).to(tl.int64)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_rows = x_ptr + tok[:, None] * stride_xt
    ws_base = ws_ptr + split * stride_ws_split + sl * stride_ws_slice
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        a_rows = a_ptr + (row0 + offs_r)[:, None] * stride_a
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(xt, tl.trans(at), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(at))
        ws = ws_base + pos[:, None] * stride_ws_pos + offs_r[None, :]
        tl.store(ws, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def lora_expand_kernel(
    ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos,
    b0_ptr, b1_ptr, b2_ptr, stride_b0, stride_b1, stride_b2,
    y0_ptr, y1_ptr, y2_ptr, stride_y0, stride_y1, stride_y2,
    rank0_ptr, rank1_ptr, rank2_ptr,
    n0, n1, n2, nb_end0, nb_end1,
    sorted_ptr, slot_bounds_ptr, tile_slot_ptr, tile_start_ptr, row_start_ptr, scale_ptr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """y_i[tok, n] += scale * sum_split(ws[split, i, pos, :r]) @ b_i[rows, n]; program = (tile, column block).

    Column blocks of all slices are numbered one after another: slice 0 owns blocks [0, nb_end0), slice 1
    [nb_end0, nb_end1), slice 2 the rest.
    """
    tile = tl.program_id(0)
    nb = tl.program_id(1)
    slot, pos, m_mask, tok = _tile_tokens(tile, tile_slot_ptr, tile_start_ptr, slot_bounds_ptr, sorted_ptr, BLOCK_M)
    if slot < 0:
        return
    sl = (nb >= nb_end0).to(tl.int32) + (nb >= nb_end1).to(tl.int32)
    if sl == 0:
        rank_ptr, b_ptr, y_ptr, stride_b, stride_y = rank0_ptr, b0_ptr, y0_ptr, stride_b0, stride_y0
    elif sl == 1:
        rank_ptr, b_ptr, y_ptr, stride_b, stride_y = rank1_ptr, b1_ptr, y1_ptr, stride_b1, stride_y1
    else:
        rank_ptr, b_ptr, y_ptr, stride_b, stride_y = rank2_ptr, b2_ptr, y2_ptr, stride_b2, stride_y2
    rank = tl.load(rank_ptr + slot)
    if rank == 0:
        return
    n_out = tl.where(sl == 0, n0, tl.where(sl == 1, n1, n2))
    first_nb = tl.where(sl == 0, 0, tl.where(sl == 1, nb_end0, nb_end1))
    offs_n = (nb - first_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_out
    row0 = tl.load(row_start_ptr + slot).to(tl.int64)
    ws_rows = ws_ptr + sl * stride_ws_slice + pos[:, None] * stride_ws_pos
    y_ptrs = y_ptr + tok[:, None] * stride_y + offs_n[None, :]
    ym = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=ym, other=0.0)  # issued before the rank loop so its latency overlaps B's
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        hm = m_mask[:, None] & r_mask[None, :]
        h = tl.load(ws_rows + offs_r[None, :], mask=hm, other=0.0)
        for s in tl.static_range(1, SPLIT_K):
            h += tl.load(ws_rows + s * stride_ws_split + offs_r[None, :], mask=hm, other=0.0)
        bt = tl.load(
            b_ptr + (row0 + offs_r)[:, None] * stride_b + offs_n[None, :],
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(h, bt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(h.to(bt.dtype), bt)
    acc *= tl.load(scale_ptr + slot)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=ym)
