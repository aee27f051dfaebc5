"""The NF4 matmul's output: its programs' stores (_epilogue) and the split-K sums, by nf4_reduce_kernel (a launch of
its own, reduce_splits) or by nf4_matmul_kernel's own programs (FIXUP: fixup_wanted, split_counts). Both add the
slices in the same order, so their results are bit-identical."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import pdl_args, pdl_enter


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


# A split-K launch of nf4_matmul_kernel can sum its K slices itself (FIXUP: the program of each tile's last slice
# waits for the others' counts, then adds them up; no nf4_reduce_kernel launch). It pays where a LoRA finish hook
# declines the sums (steps past the finish's limit, whose expand follows the matmul). On the H200
# (bench/engine_gpu.py, Llama-3-8B shape, NF4, decode tok/s, against the reduce launch, thirty-first session, two
# rounds interleaved): batch 32 with 32 distinct adapters 5,215-5,235 against 5,164-5,198, with one 5,967-5,977
# against 5,944-5,955, batch 16 with one 3,744-3,748 against 3,717-3,728, batch 8 1,914 against 1,899-1,903. An
# earlier form, where every program waited for the count's result and the last to arrive summed (thirtieth
# session), gained about half of that and cost base-model steps 4-5% (batch 32 6,494-6,508 against 6,778-6,801); a
# form of this one that added the last slice's sums from registers, unstored, was not bit-equal to the reduce at 64
# rows on the GPU (a few outputs one bf16 step apart, the same ones every run), and base steps lost 3.5% with it.
# So base-model steps keep the reduce launch. HOTLORA_NF4_FIXUP=0: never; 1: every split launch.
# The counts are one int32 buffer per device, created outside graph capture (a graph's eager warm-up creates it) and
# left all zero by every launch: nf4_matmul calls on one device must not run concurrently on two streams (hotlora
# runs them on the model's stream).
FIXUP_TILES = 1 << 16
SPLIT_COUNTS: dict[torch.device, torch.Tensor] = {}


def fixup_wanted(declined: bool) -> bool:
    """Whether a split launch whose sums no hook takes sums them itself: where a finish hook declined them
    (`declined`; not with no hook at all), unless HOTLORA_NF4_FIXUP says otherwise."""
    flag = os.environ.get("HOTLORA_NF4_FIXUP")
    return declined if flag is None else flag == "1"


def split_counts(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The device's split counts for a launch of `tiles` programs along axis 0, or None: too many tiles, or no
    buffer yet while a graph is captured."""
    if tiles > FIXUP_TILES:
        return None
    counts = SPLIT_COUNTS.get(device)
    if counts is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counts = SPLIT_COUNTS[device] = torch.zeros(FIXUP_TILES, dtype=torch.int32, device=device)
    return counts


# nf4_reduce_kernel's blocks: the largest power of two that still gives REDUCE_PROGRAMS programs (one an SM of the
# H200), within 128-1,024 outputs (4 warps, 1-8 a thread). Until the forty-first session every block was 1,024, so at
# decode sizes the sums of 4-8 slices were read by 4-6 programs (M = 1: o, down, q/k/v) or 96-112 (q/k/v at 8-16 rows,
# gate/up at 4); on the H200 (bench/nf4_gemm.py, whole nf4_matmul, us, two rounds alike) M = 1 q/k/v 10.4 -> 9.9, o
# 8.1 -> 7.9, down 19.6 -> 19.5, gate/up 34.7 -> 34.5; M = 4 q/k/v 10.7 -> 10.0-10.1, o 8.4 -> 8.0-8.1, gate/up 34.0 ->
# 33.6; M = 8 q/k/v 10.7 -> 10.1, o 8.4 -> 8.0-8.1, down 19.8 -> 19.6; M = 16 q/k/v 12.0 -> 11.7, o 9.4 -> 9.1, down
# 22.0 -> 21.7. (Blocks of 32-64 outputs over 1-2 warps, 128-256 programs at M = 1-4, were no faster at M = 1 and lost
# 0.1 us on o and down at M = 4.)
REDUCE_PROGRAMS = 132
REDUCE_MIN_BLOCK = 128
REDUCE_MAX_BLOCK = 1024


def reduce_block(outputs: int) -> int:
    """nf4_reduce_kernel's block for `outputs` sums (REDUCE_PROGRAMS)."""
    return max(REDUCE_MIN_BLOCK, min(REDUCE_MAX_BLOCK, triton.next_power_of_2(outputs // REDUCE_PROGRAMS + 1) // 2))


def reduce_splits(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """y = part.sum(0) (+ bias), part fp32 [split, M, N]."""
    split, m, n = part.shape
    block = reduce_block(m * n)
    nf4_reduce_kernel[(triton.cdiv(m * n, block),)](
        part, bias if bias is not None else y, y, m, n, y.stride(0),
        HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK=block, **pdl_args(part),
    )
    return y
