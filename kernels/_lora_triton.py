"""Triton kernels of the LoRA gather-matmul; wrappers and semantics in lora.py.

Work is cut into items that each read the rows of exactly one adapter:
- a shrink item is (tile, split of in_features, slice): it writes the fp32 partial x[tok] @ A[rows].T of its
  split into workspace[split]; a tile = up to BLOCK_M tokens of one slot (``LoraMeta``), idle tiles exit;
- an expand item is (tile, column block): it sums the SPLIT_K partials (fixed order, deterministic) and adds
  scale * h @ B[rows] into its y columns. Column blocks of all slices are numbered one after another.
Up to three slices (q, k, v or gate, up) share a launch: each item picks its slice's pointers.

Two ways to run them:
- two launches (``lora_shrink_kernel`` then ``lora_expand_kernel``). On Hopper (``PDL``) the expand is a
  programmatic dependent launch: it loads its tile records, y and B rows during the shrink and waits for the
  shrink's results (``gdc_wait``) only before reading the workspace;
- one persistent launch (``lora_fused_kernel``): every program runs its shrink items, then its expand items;
  an expand item waits for its tile's shrink items through an arrival counter per (tile, slice) (release /
  acquire atomics). No program waits in the shrink phase, so the spin cannot deadlock as long as every
  program is resident (the grid is at most one program per SM; under the CPU interpreter it is 1 program).
  The last expand item of a (tile, slice) resets both of its counters, so the next launch finds zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _interp_compat

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
def _pick(sl, p0, p1, p2):
    """The slice's pointer (or stride) out of three: Triton has no pointer arrays."""
    if sl == 0:
        p = p0
    elif sl == 1:
        p = p1
    else:
        p = p2
    return p


@triton.jit
def _where3(sl, v0, v1, v2):
    """The slice's integer out of three."""
    return tl.where(sl == 0, v0, tl.where(sl == 1, v1, v2))


@triton.jit
def _shrink_item(
    x_ptr, stride_xt, a_ptr, stride_a, rank, row0, pos, m_mask, tok, ws_rows, k_lo, k_hi,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """ws_rows[:, :rank] = x[tok, k_lo:k_hi] @ a[row0 : row0 + rank, k_lo:k_hi].T in fp32."""
    x_rows = x_ptr + tok[:, None] * stride_xt
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
        tl.store(ws_rows + offs_r[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_item(
    ws_rows, stride_ws_split, b_ptr, stride_b, y_ptr, stride_y, rank, row0, scale, m_mask, tok, offs_n, n_out,
    arrivals_ptr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr, GDC_WAIT: tl.constexpr, SPIN: tl.constexpr,
):  # fmt: skip
    """y[tok, offs_n] += scale * (sum of the SPLIT_K partials at ws_rows)[:, :rank] @ b[row0 + r, offs_n].

    y and the first B rows are loaded before waiting for the partials: GDC_WAIT waits for the preceding grid
    (the shrink launch), SPIN for SPLIT_K arrivals at arrivals_ptr (the fused kernel's shrink items).
    """
    n_mask = offs_n < n_out
    y_ptrs = y_ptr + tok[:, None] * stride_y + offs_n[None, :]
    ym = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=ym, other=0.0)
    b_rows = b_ptr + row0 * stride_b + offs_n[None, :]
    offs_r = tl.arange(0, BLOCK_R)
    bt = tl.load(b_rows + offs_r[:, None] * stride_b, mask=(offs_r < rank)[:, None] & n_mask[None, :], other=0.0)
    if GDC_WAIT:
        tl.extra.cuda.gdc_wait()  # the shrink's workspace is complete and visible from here on
    if SPIN:
        while tl.atomic_add(arrivals_ptr, 0, sem="acquire") < SPLIT_K:
            pass
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        if r0 > 0:
            bt = tl.load(b_rows + offs_r[:, None] * stride_b, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        hm = m_mask[:, None] & r_mask[None, :]
        h = tl.load(ws_rows + offs_r[None, :], mask=hm, other=0.0, cache_modifier=".cg")
        for s in tl.static_range(1, SPLIT_K):
            h += tl.load(ws_rows + s * stride_ws_split + offs_r[None, :], mask=hm, other=0.0, cache_modifier=".cg")
        if IEEE:
            acc += tl.dot(h, bt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(h.to(bt.dtype), bt)
    tl.store(y_ptrs, (y.to(tl.float32) + acc * scale).to(y.dtype), mask=ym)


@triton.jit
def lora_shrink_kernel(
    x_ptr, stride_xt,
    a0_ptr, a1_ptr, a2_ptr, stride_a0, stride_a1, stride_a2,
    rank0_ptr, rank1_ptr, rank2_ptr,
    ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos,
    sorted_ptr, tile_info_ptr,
    K, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """ws[split, i, pos, :r] = x[tok, split's K range] @ a_i[rows].T in fp32; program = (tile, split, slice)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tile = tl.program_id(0)
    split = tl.program_id(1)
    sl = tl.program_id(2)
    slot, row0, pos, m_mask, tok = _tile(tile_info_ptr, tile, sorted_ptr, BLOCK_M)
    if slot < 0:
        return
    rank = tl.load(_pick(sl, rank0_ptr, rank1_ptr, rank2_ptr) + slot)
    if rank == 0:
        return
    k_lo = split * k_per_split
    ws_rows = ws_ptr + split * stride_ws_split + sl * stride_ws_slice + pos[:, None] * stride_ws_pos
    _shrink_item(
        x_ptr, stride_xt, _pick(sl, a0_ptr, a1_ptr, a2_ptr), _where3(sl, stride_a0, stride_a1, stride_a2),
        rank, row0, pos, m_mask, tok, ws_rows, k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_M, BLOCK_R, BLOCK_K, IEEE,
    )  # fmt: skip


@triton.jit
def lora_expand_kernel(
    ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos,
    b0_ptr, b1_ptr, b2_ptr, stride_b0, stride_b1, stride_b2,
    y0_ptr, y1_ptr, y2_ptr, stride_y0, stride_y1, stride_y2,
    rank0_ptr, rank1_ptr, rank2_ptr,
    n0, n1, n2, nb_end0, nb_end1,
    sorted_ptr, tile_info_ptr, scale_ptr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """y_i[tok, n] += scale * sum_s ws[s, i, pos, :r] @ b_i[rows, n]; program = (tile, column block).

    Slice 0 owns column blocks [0, nb_end0), slice 1 [nb_end0, nb_end1), slice 2 the rest.
    """
    tile = tl.program_id(0)
    nb = tl.program_id(1)
    slot, row0, pos, m_mask, tok = _tile(tile_info_ptr, tile, sorted_ptr, BLOCK_M)
    if slot < 0:
        return
    sl = (nb >= nb_end0).to(tl.int32) + (nb >= nb_end1).to(tl.int32)
    rank = tl.load(_pick(sl, rank0_ptr, rank1_ptr, rank2_ptr) + slot)
    if rank == 0:
        return
    offs_n = (nb - _where3(sl, 0, nb_end0, nb_end1)) * BLOCK_N + tl.arange(0, BLOCK_N)
    _expand_item(
        ws_ptr + sl * stride_ws_slice + pos[:, None] * stride_ws_pos, stride_ws_split,
        _pick(sl, b0_ptr, b1_ptr, b2_ptr), _where3(sl, stride_b0, stride_b1, stride_b2),
        _pick(sl, y0_ptr, y1_ptr, y2_ptr), _where3(sl, stride_y0, stride_y1, stride_y2),
        rank, row0, tl.load(scale_ptr + slot), m_mask, tok, offs_n, _where3(sl, n0, n1, n2), ws_ptr,
        SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_R, IEEE, PDL, False,
    )  # fmt: skip


@triton.jit
def lora_fused_kernel(
    x_ptr, stride_xt,
    a0_ptr, a1_ptr, a2_ptr, stride_a0, stride_a1, stride_a2,
    b0_ptr, b1_ptr, b2_ptr, stride_b0, stride_b1, stride_b2,
    y0_ptr, y1_ptr, y2_ptr, stride_y0, stride_y1, stride_y2,
    rank0_ptr, rank1_ptr, rank2_ptr,
    n0, n1, n2, nb_end0, nb_end1, nb_total,
    ws_ptr, stride_ws_split, stride_ws_slice, stride_ws_pos,
    flags_ptr, sorted_ptr, tile_info_ptr, scale_ptr,
    K, k_per_split, n_tiles,
    NUM_SLICES: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Shrink and expand in one persistent launch; flags = int32 [2, n_tiles, 3] (arrivals, departures)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # a following PDL launch may get resident; it waits for us
        tl.extra.cuda.gdc_wait()  # x, y and the workspace belong to the preceding grid until it completes
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    per_tile = SPLIT_K * NUM_SLICES
    for item in range(pid, n_tiles * per_tile, programs):
        tile = item // per_tile
        split = (item % per_tile) // NUM_SLICES
        sl = item % NUM_SLICES
        slot, row0, pos, m_mask, tok = _tile(tile_info_ptr, tile, sorted_ptr, BLOCK_M)
        if slot >= 0:
            rank = tl.load(_pick(sl, rank0_ptr, rank1_ptr, rank2_ptr) + slot)
            if rank > 0:
                k_lo = split * k_per_split
                ws_rows = ws_ptr + split * stride_ws_split + sl * stride_ws_slice + pos[:, None] * stride_ws_pos
                _shrink_item(
                    x_ptr, stride_xt, _pick(sl, a0_ptr, a1_ptr, a2_ptr), _where3(sl, stride_a0, stride_a1, stride_a2),
                    rank, row0, pos, m_mask, tok, ws_rows, k_lo, tl.minimum(k_lo + k_per_split, K),
                    BLOCK_M, BLOCK_R, BLOCK_K, IEEE,
                )  # fmt: skip
                tl.debug_barrier()  # every thread's partial is stored before the arrival is released
                tl.atomic_add(flags_ptr + tile * 3 + sl, 1, sem="release")
    for item in range(pid, n_tiles * nb_total, programs):
        tile = item // nb_total
        nb = item % nb_total
        slot, row0, pos, m_mask, tok = _tile(tile_info_ptr, tile, sorted_ptr, BLOCK_M)
        sl = (nb >= nb_end0).to(tl.int32) + (nb >= nb_end1).to(tl.int32)
        if slot >= 0:
            rank = tl.load(_pick(sl, rank0_ptr, rank1_ptr, rank2_ptr) + slot)
            if rank > 0:
                n_out = _where3(sl, n0, n1, n2)
                first_nb = _where3(sl, 0, nb_end0, nb_end1)
                offs_n = (nb - first_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
                arrivals = flags_ptr + tile * 3 + sl
                _expand_item(
                    ws_ptr + sl * stride_ws_slice + pos[:, None] * stride_ws_pos, stride_ws_split,
                    _pick(sl, b0_ptr, b1_ptr, b2_ptr), _where3(sl, stride_b0, stride_b1, stride_b2),
                    _pick(sl, y0_ptr, y1_ptr, y2_ptr), _where3(sl, stride_y0, stride_y1, stride_y2),
                    rank, row0, tl.load(scale_ptr + slot), m_mask, tok, offs_n, n_out, arrivals,
                    SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_R, IEEE, False, True,
                )  # fmt: skip
                # the last of the slice's column blocks to finish resets the counters for the next launch
                departures = arrivals + n_tiles * 3
                if tl.atomic_add(departures, 1, sem="relaxed") == tl.cdiv(n_out, BLOCK_N) - 1:
                    tl.atomic_xchg(arrivals, 0, sem="relaxed")
                    tl.atomic_xchg(departures, 0, sem="relaxed")
