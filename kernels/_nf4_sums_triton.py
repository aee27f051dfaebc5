"""The NF4 matmul's split-K sums: nf4_reduce_kernel (a launch of its own) and the helpers with which
nf4_matmul_kernel's last program of a tile sums them itself (FIXUP; hotlora.kernels.nf4 says where each runs).
Both add the slices in the same order, so their results are bit-identical."""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import pdl_enter


@triton.jit
def _sum_splits(part_ptr, offs_m, mask_m, offs_n, mask_n, bias_ptr, y_ptr, M, N, stride_ym, HAS_BIAS: tl.constexpr,
                SPLIT_K: tl.constexpr):
    """y[rows, cols] = the K slices' sums in part, in order, (+ bias): nf4_reduce_kernel's arithmetic for one tile.
    The loads bypass L1 (.cg): other programs wrote those sums during this kernel."""
    mask = mask_m[:, None] & mask_n[None, :]
    ptrs = part_ptr + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ptrs + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _last_split(count_ptr, SPLIT_K: tl.constexpr):
    """Whether this program is the last of its tile's K slices to have stored its sums: each counts itself in
    (after a barrier, so every thread's stores precede the release), and the last one resets the count to zero
    for the next launch."""
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
    last = done == SPLIT_K - 1
    if last:
        tl.atomic_xchg(count_ptr + tl.program_id(0), 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def nf4_reduce_kernel(part_ptr, bias_ptr, y_ptr, M, N, stride_ym,
                      HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """y[m, n] = sum_k part[k, m, n] (+ bias[n]), in a fixed order (deterministic)."""
    pdl_enter(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + k * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + (offs // N) * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=mask)
