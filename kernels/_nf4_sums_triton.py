"""The NF4 matmul's output: its programs' stores (_epilogue) and the split-K sums, by nf4_reduce_kernel (a launch of
its own) or by nf4_matmul_kernel's own programs (FIXUP; hotlora.kernels.nf4 says where each runs). Both add the
slices in the same order, so their results are bit-identical."""

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
def _count_in(count_ptr):
    """This program's sums are stored: count it in for its tile (after a barrier, so every thread's stores precede
    the release), without waiting for the count (its result is unused)."""
    tl.debug_barrier()
    tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="release", scope="gpu")


@triton.jit
def _await_slices(count_ptr, SLICES: tl.constexpr):
    """Wait until SLICES programs of this tile counted in (_count_in), then reset the count; the acquire (one
    thread's, as every scalar atomic) and the barrier after it make their sums visible to all of this program's
    threads. The waiting program must be dispatched after those it waits for (the grid's last row)."""
    done = tl.atomic_add(count_ptr + tl.program_id(0), 0, sem="relaxed", scope="gpu")
    while done < SLICES:
        done = tl.atomic_add(count_ptr + tl.program_id(0), 0, sem="relaxed", scope="gpu")
    tl.atomic_xchg(count_ptr + tl.program_id(0), 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


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


@triton.jit
def _store(acc, offs_m, mask_m, offs_n, mask_n, bias_ptr, y_ptr, part_ptr, pid_k, M, N, stride_ym,
           HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr, SPLIT_K: tl.constexpr):
    """A program's tile of y (or with SPLIT_K > 1 of its K slice's fp32 sums in part), bias added."""
    acc = _plain(acc, SWAP_AB)
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        tl.store(part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _plain(acc, SWAP_AB: tl.constexpr):
    """An accumulator as [rows of x, columns of y]."""
    if SWAP_AB:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _store_both(acc, acc_t, offs_m, mask_m, offs_t, mask_t, offs_n, mask_n, bias_ptr, y_ptr, part_ptr, pid_k, M, N,
                stride_ym, HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr, SPLIT_K: tl.constexpr,
                TAIL_M: tl.constexpr):
    """_store of the row tile and, with TAIL_M, of the tail tile."""
    if TAIL_M > 0:
        _store(acc_t, offs_t, mask_t, offs_n, mask_n, bias_ptr, y_ptr, part_ptr, pid_k, M, N, stride_ym, HAS_BIAS,
               SWAP_AB, SPLIT_K)
    _store(acc, offs_m, mask_m, offs_n, mask_n, bias_ptr, y_ptr, part_ptr, pid_k, M, N, stride_ym, HAS_BIAS,
           SWAP_AB, SPLIT_K)


@triton.jit
def _sum_both(part_ptr, offs_m, mask_m, offs_t, mask_t, offs_n, mask_n, bias_ptr, y_ptr, M, N, stride_ym,
              HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, TAIL_M: tl.constexpr):
    """_sum_splits of the row tile and, with TAIL_M, of the tail tile."""
    _sum_splits(part_ptr, offs_m, mask_m, offs_n, mask_n, bias_ptr, y_ptr, M, N, stride_ym, HAS_BIAS, SPLIT_K)
    if TAIL_M > 0:
        _sum_splits(part_ptr, offs_t, mask_t, offs_n, mask_n, bias_ptr, y_ptr, M, N, stride_ym, HAS_BIAS, SPLIT_K)


@triton.jit
def _epilogue(acc, acc_t, offs_m, mask_m, offs_t, mask_t, offs_n, mask_n, bias_ptr, y_ptr, part_ptr, count_ptr,
              pid_k, M, N, stride_ym, HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr, SPLIT_K: tl.constexpr,
              TAIL_M: tl.constexpr, FIXUP: tl.constexpr):
    """nf4_matmul_kernel's output of a program (its docstring: FIXUP): the row tile's accumulator and, with TAIL_M,
    the tail's (acc_t, offs_t, mask_t; stand-ins otherwise)."""
    _store_both(acc, acc_t, offs_m, mask_m, offs_t, mask_t, offs_n, mask_n, bias_ptr, y_ptr, part_ptr, pid_k, M, N,
                stride_ym, HAS_BIAS, SWAP_AB, SPLIT_K, TAIL_M)
    if FIXUP:
        if pid_k == SPLIT_K - 1:  # the grid's last row of programs: every other slice's program has started
            tl.debug_barrier()  # this program's own sums are stored before any of its threads reads them back
            _await_slices(count_ptr, SPLIT_K - 1)
            _sum_both(part_ptr, offs_m, mask_m, offs_t, mask_t, offs_n, mask_n, bias_ptr, y_ptr, M, N, stride_ym,
                      HAS_BIAS, SPLIT_K, TAIL_M)
        else:
            _count_in(count_ptr)
