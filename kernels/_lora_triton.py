"""Triton kernels of the LoRA gather-matmul (shrink and expand); wrappers and semantics in lora.py.

Grid of both kernels: axis 0 walks the tiles of ``LoraMeta`` (a tile = up to BLOCK_M tokens of one slot,
idle tiles exit at once), so every program reads the rows of exactly one adapter. Up to three slices
(q, k, v or gate, up) share a launch: the slice's pointers are picked per program.

Split-K: the shrink programs of one (tile, slice) write fp32 partials; the last to finish (a per-tile
counter, reset to 0 by that program, so the next launch or graph replay finds zeros) sums them into
split 0, so the expand reads one partial.

Programmatic dependent launch (Hopper, ``PDL``): the shrink starts with ``_launch.pdl_enter`` (it waits for
the kernel before it, then lets the next launch); the expand loads its tile metadata and B rows, then waits
(``gdc_wait``) for the kernel before it: right after the shrink (``lora_apply``) it reads the output rows
before the wait and the shrink's results after it; after the base output's writer (``lora_project``,
WAIT_Y) the output rows after it (the shrink finished earlier). The finish likewise loads the token's
slot, its first B rows and the bias (none of which the matmul before it writes) ahead of its ``pdl_enter``, and
after it only the split sums and the shrink's result: +2-4% at batch 1-4 with one adapter on the H200 (twelfth
session, BENCHMARKS.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _interp_compat
from ._launch import pdl_enter

_interp_compat.install()


@triton.jit
def _tile(tile_info_ptr, tile, sorted_ptr, BLOCK_M: tl.constexpr):
    """(slot, first pool row, sorted positions, their mask, token indices) of a tile; slot < 0 when idle."""
    info = tile_info_ptr + tile * 4  # [slot, start, end, row_start] per tile, one 16-byte record
    slot = tl.load(info)
    start = tl.load(info + 1)
    end = tl.load(info + 2)
    row0 = tl.load(info + 3).to(tl.int64)
    pos = start + tl.arange(0, BLOCK_M)
    m_mask = pos < end
    tok = tl.load(sorted_ptr + pos, mask=m_mask, other=0).to(tl.int64)
    return slot, row0, pos, m_mask, tok


@triton.jit
def _parts(ptrs, stride_part, mask, PARTS: tl.constexpr):
    """The sum of PARTS fp32 partials at ptrs, ptrs + stride_part, ... (1: the shrink's summed split 0; more:
    the parts kernels.lora_fused writes)."""
    h = tl.load(ptrs, mask=mask, other=0.0)
    for q in tl.static_range(1, PARTS):
        h += tl.load(ptrs + q * stride_part, mask=mask, other=0.0)
    return h


@triton.jit
def lora_shrink_kernel(
    x_ptr, stride_xt,
    a0_ptr, a1_ptr, a2_ptr, stride_a0, stride_a1, stride_a2,
    rank0_ptr, rank1_ptr, rank2_ptr,
    ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos,
    count_ptr, sorted_ptr, tile_info_ptr,
    K, k_per_split,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """ws[0, i, pos, :r] = x[tok] @ a_i[rows].T in fp32; program = (tile, split of K, slice)."""
    pdl_enter(PDL)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    sl = tl.program_id(2)
    slot, row0, pos, m_mask, tok = _tile(tile_info_ptr, tile, sorted_ptr, BLOCK_M)
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
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_rows = x_ptr + tok[:, None] * stride_xt
    ws_rows = ws_ptr + sl * stride_ws_slice + pos[:, None] * stride_ws_pos
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
        tl.store(ws_rows + split * stride_ws_split + offs_r[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])
    if SPLIT_K > 1:
        # all threads' partial stores happen before the counter's release; the last arrival sums the splits
        tl.debug_barrier()
        counter = count_ptr + tile * 3 + sl
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
            tl.debug_barrier()
            for r0 in range(0, rank, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                hm = m_mask[:, None] & (offs_r < rank)[None, :]
                h = tl.load(ws_rows + offs_r[None, :], mask=hm, other=0.0, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT_K):
                    part = ws_rows + s * stride_ws_split + offs_r[None, :]
                    h += tl.load(part, mask=hm, other=0.0, cache_modifier=".cg")
                tl.store(ws_rows + offs_r[None, :], h, mask=hm)
            tl.atomic_xchg(counter, 0, sem="relaxed")


@triton.jit
def lora_expand_kernel(
    ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos,
    b0_ptr, b1_ptr, b2_ptr, stride_b0, stride_b1, stride_b2,
    y0_ptr, y1_ptr, y2_ptr, stride_y0, stride_y1, stride_y2,
    rank0_ptr, rank1_ptr, rank2_ptr,
    n0, n1, n2, nb_end0, nb_end1,
    sorted_ptr, tile_info_ptr, scale_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    PARTS: tl.constexpr, WAIT_Y: tl.constexpr,
):  # fmt: skip
    """y_i[tok, n] += scale * ws[:PARTS, i, pos, :r].sum(0) @ b_i[rows, n]; program = (tile, column block).

    Column blocks of all slices are numbered one after another: slice 0 owns blocks [0, nb_end0), slice 1
    [nb_end0, nb_end1), slice 2 the rest. With PDL the program waits (gdc_wait) for the kernel launched before
    it: WAIT_Y, that kernel wrote y (the base matmul or its split-K reduce; the shrink finished before it), so y
    is read after the wait; else it is the shrink, and y is read before it, the workspace after.
    """
    tile = tl.program_id(0)
    nb = tl.program_id(1)
    slot, row0, pos, m_mask, tok = _tile(tile_info_ptr, tile, sorted_ptr, BLOCK_M)
    if slot < 0:
        return
    sl, first_nb, n_out, _ = _slice_of(nb, n0, n1, n2, nb_end0, nb_end1)
    if sl == 0:
        rank_ptr, b_ptr, y_ptr, stride_b, stride_y = rank0_ptr, b0_ptr, y0_ptr, stride_b0, stride_y0
    elif sl == 1:
        rank_ptr, b_ptr, y_ptr, stride_b, stride_y = rank1_ptr, b1_ptr, y1_ptr, stride_b1, stride_y1
    else:
        rank_ptr, b_ptr, y_ptr, stride_b, stride_y = rank2_ptr, b2_ptr, y2_ptr, stride_b2, stride_y2
    rank = tl.load(rank_ptr + slot)
    if rank == 0:
        return
    offs_n = (nb - first_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_out
    y_ptrs = y_ptr + tok[:, None] * stride_y + offs_n[None, :]
    ym = m_mask[:, None] & n_mask[None, :]
    if not WAIT_Y:
        y = tl.load(y_ptrs, mask=ym, other=0.0)
    scale = tl.load(scale_ptr + slot)
    b_rows = b_ptr + row0 * stride_b + offs_n[None, :]
    ws_rows = ws_ptr + sl * stride_ws_slice + pos[:, None] * stride_ws_pos
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    bt = tl.load(b_rows + offs_r[:, None] * stride_b, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()  # the kernel before (docstring) is complete and its writes visible
    if WAIT_Y:
        y = tl.load(y_ptrs, mask=ym, other=0.0)
    h = _parts(ws_rows + offs_r[None, :], stride_ws_split, m_mask[:, None] & r_mask[None, :], PARTS)
    acc = _higher_ranks(_expand_dot(h, bt, None, IEEE), b_rows, stride_b, ws_rows, stride_ws_split, m_mask, n_mask,
                        rank, BLOCK_R, PARTS, IEEE)
    tl.store(y_ptrs, (y.to(tl.float32) + acc * scale).to(y.dtype), mask=ym)


@triton.jit
def _higher_ranks(acc, b_rows, stride_b, ws_rows, stride_ws_split, m_mask, n_mask, rank, BLOCK_R: tl.constexpr,
                  PARTS: tl.constexpr, IEEE: tl.constexpr):
    """acc + the delta of rank rows BLOCK_R .. rank - 1 (ranks above the step's class), BLOCK_R at a time."""
    for r0 in range(BLOCK_R, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        bt = tl.load(b_rows + offs_r[:, None] * stride_b, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        h = _parts(ws_rows + offs_r[None, :], stride_ws_split, m_mask[:, None] & r_mask[None, :], PARTS)
        acc = _expand_dot(h, bt, acc, IEEE)
    return acc


@triton.jit
def _slice_of(nb, n0, n1, n2, nb_end0, nb_end1):
    """(slice, its first column block, its width, its first column in a fused output) of column block nb, the
    blocks of slices 0, 1, 2 numbered one after another (slice 0: [0, nb_end0), slice 1: [nb_end0, nb_end1))."""
    sl = (nb >= nb_end0).to(tl.int32) + (nb >= nb_end1).to(tl.int32)
    first_nb = tl.where(sl == 0, 0, tl.where(sl == 1, nb_end0, nb_end1))
    n_out = tl.where(sl == 0, n0, tl.where(sl == 1, n1, n2))
    col0 = tl.where(sl == 0, 0, tl.where(sl == 1, n0, n0 + n1))
    return sl, first_nb, n_out, col0


@triton.jit
def _slice_b(sl, rank0_ptr, rank1_ptr, rank2_ptr, b0_ptr, b1_ptr, b2_ptr, stride_b0, stride_b1, stride_b2):
    """Slice sl's rank table, B pool and B row stride (an if-chain: Triton has no pointer arrays)."""
    if sl == 0:
        rank_ptr, b_ptr, stride_b = rank0_ptr, b0_ptr, stride_b0
    elif sl == 1:
        rank_ptr, b_ptr, stride_b = rank1_ptr, b1_ptr, stride_b1
    else:
        rank_ptr, b_ptr, stride_b = rank2_ptr, b2_ptr, stride_b2
    return rank_ptr, b_ptr, stride_b


@triton.jit
def _expand_dot(h, bt, acc, IEEE: tl.constexpr):
    """acc (+)= h [BLOCK_M, BLOCK_R] fp32 @ bt [BLOCK_R, BLOCK_N]: in fp32 for fp32 pools, else in B's dtype."""
    if IEEE:
        return tl.dot(h, bt.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(h.to(bt.dtype), bt, acc)


@triton.jit
def lora_finish_kernel(
    part_ptr, stride_part_split, stride_part_t, bias_ptr, y_ptr, stride_y,
    ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos,
    b0_ptr, b1_ptr, b2_ptr, stride_b0, stride_b1, stride_b2,
    rank0_ptr, rank1_ptr, rank2_ptr,
    n0, n1, n2, nb_end0, nb_end1,
    slots_ptr, pos_ptr, row_start_ptr, scale_ptr, num_slots,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
    PARTS: tl.constexpr,
):  # fmt: skip
    """y[t, cols_i] = sum_s part[s, t, cols_i] (+ bias) + scale * ws[:PARTS, i, pos(t), :r].sum(0) @ b_i[rows, :]
    in fp32, rounded once; program = (token, column block). A base matmul's split-K sums and the LoRA expand in one
    pass (column blocks per slice as in lora_expand_kernel; slice i's columns start at n0 + ... + n_{i-1})."""
    t = tl.program_id(0)
    nb = tl.program_id(1)
    sl, first_nb, n_out, col0 = _slice_of(nb, n0, n1, n2, nb_end0, nb_end1)
    rank_ptr, b_ptr, stride_b = _slice_b(sl, rank0_ptr, rank1_ptr, rank2_ptr, b0_ptr, b1_ptr, b2_ptr, stride_b0,
                                         stride_b1, stride_b2)
    offs_n = (nb - first_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_out
    cols = col0 + offs_n
    # the token's adapter, its first B rows and the bias: nothing the matmul before writes, so loaded ahead of
    # the PDL wait (after it, only the split sums and the shrink's result remain to be read)
    slot = tl.load(slots_ptr + t)
    valid = (slot >= 0) & (slot < num_slots)
    slot = tl.where(valid, slot, 0)
    rank = tl.load(rank_ptr + slot, mask=valid, other=0)
    row0 = tl.load(row_start_ptr + slot, mask=valid, other=0).to(tl.int64)
    h_row = ws_ptr + sl * stride_ws_slice + tl.load(pos_ptr + t).to(tl.int64) * stride_ws_pos
    scale = tl.load(scale_ptr + slot, mask=valid, other=0.0)
    offs_r = tl.arange(0, BLOCK_R)
    bt = tl.load(b_ptr + (row0 + offs_r)[:, None] * stride_b + offs_n[None, :],
                 mask=(offs_r < rank)[:, None] & n_mask[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
    pdl_enter(PDL)
    acc = tl.load(part_ptr + t * stride_part_t + cols, mask=n_mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * stride_part_split + t * stride_part_t + cols, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += bias
    if rank > 0:
        h = _parts(h_row + offs_r, stride_ws_split, offs_r < rank, PARTS)
        delta = tl.sum(h[:, None] * bt.to(tl.float32), axis=0)
        for r0 in range(BLOCK_R, rank, BLOCK_R):  # ranks above the largest class
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            h = _parts(h_row + offs_r, stride_ws_split, r_mask, PARTS)
            bt = tl.load(b_ptr + (row0 + offs_r)[:, None] * stride_b + offs_n[None, :],
                         mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            delta += tl.sum(h[:, None] * bt.to(tl.float32), axis=0)
        acc += delta * scale
    tl.store(y_ptr + t * stride_y + cols, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def lora_tile_finish_kernel(
    part_ptr, stride_part_split, stride_part_t, bias_ptr, y_ptr, stride_y,
    ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos,
    b0_ptr, b1_ptr, b2_ptr, stride_b0, stride_b1, stride_b2,
    rank0_ptr, rank1_ptr, rank2_ptr,
    n0, n1, n2, nb_end0, nb_end1,
    sorted_ptr, tile_info_ptr, bounds_ptr, scale_ptr, num_slots, num_tokens, max_tiles,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, PARTS: tl.constexpr,
):  # fmt: skip
    """lora_finish_kernel's sums per tile: y[tok, cols_i] = sum_s part[s, tok, cols_i] (+ bias) + scale *
    ws[:PARTS, i, pos, :r].sum(0) @ b_i[rows, :], rounded once; program = (tile, column block) as in
    lora_expand_kernel, so a slot's B rows are read once per tile rather than once per token. Programs past
    max_tiles cover the tokens without an adapter (sorted last, from slot_bounds[num_slots]), BLOCK_M each:
    they and slices of rank 0 write the plain sums."""
    tile = tl.program_id(0)
    nb = tl.program_id(1)
    is_tile = tile < max_tiles
    info = tile_info_ptr + tl.minimum(tile, max_tiles - 1) * 4
    slot = tl.where(is_tile, tl.load(info), -1)
    start = tl.where(is_tile, tl.load(info + 1), tl.load(bounds_ptr + num_slots) + (tile - max_tiles) * BLOCK_M)
    end = tl.where(is_tile, tl.load(info + 2), num_tokens)
    if start >= end:  # an idle tile, or no token left for this tail program
        return
    row0 = tl.load(info + 3).to(tl.int64)
    pos = start + tl.arange(0, BLOCK_M)
    m_mask = pos < end
    tok = tl.load(sorted_ptr + pos, mask=m_mask, other=0).to(tl.int64)
    sl, first_nb, n_out, col0 = _slice_of(nb, n0, n1, n2, nb_end0, nb_end1)
    rank_ptr, b_ptr, stride_b = _slice_b(sl, rank0_ptr, rank1_ptr, rank2_ptr, b0_ptr, b1_ptr, b2_ptr, stride_b0,
                                         stride_b1, stride_b2)
    offs_n = (nb - first_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_out
    cols = col0 + offs_n
    busy = slot >= 0
    slot = tl.maximum(slot, 0)
    rank = tl.load(rank_ptr + slot, mask=busy, other=0)
    scale = tl.load(scale_ptr + slot, mask=busy, other=0.0)
    # the B rows and the bias: nothing the matmul before writes, so loaded ahead of the PDL wait
    b_rows = b_ptr + row0 * stride_b + offs_n[None, :]
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    bt = tl.load(b_rows + offs_r[:, None] * stride_b, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
    pdl_enter(PDL)
    ym = m_mask[:, None] & n_mask[None, :]
    acc = _parts(part_ptr + tok[:, None] * stride_part_t + cols[None, :], stride_part_split, ym, SPLIT_K)
    if HAS_BIAS:
        acc += bias[None, :]
    if rank > 0:
        ws_rows = ws_ptr + sl * stride_ws_slice + pos[:, None] * stride_ws_pos
        h = _parts(ws_rows + offs_r[None, :], stride_ws_split, m_mask[:, None] & r_mask[None, :], PARTS)
        delta = _higher_ranks(_expand_dot(h, bt, None, IEEE), b_rows, stride_b, ws_rows, stride_ws_split, m_mask,
                              n_mask, rank, BLOCK_R, PARTS, IEEE)
        acc += delta * scale
    tl.store(y_ptr + tok[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=ym)
