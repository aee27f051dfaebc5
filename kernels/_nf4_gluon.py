"""The NF4 matmul for large M on Hopper: a warp-specialized Gluon kernel (layout and semantics: kernels.nf4).

In the tl.dot kernel (``_nf4_triton.nf4_matmul_kernel``) the same warps dequantize a group and issue its
MMAs, so at M >= 256 the tensor pipe idles about half the time (ncu, BENCHMARKS.md, eleventh session) and the
launch runs at 1.5-1.6x cuBLAS. Here two partitions of one program overlap through shared memory:

- dequantize (a worker partition of ``dequant_warps`` warps): TMA copies of the weight codes ([BLOCK_N, 64]
  bytes per 128-column group) into a ring of stages, refilled as they are read; the codes through the
  register lookup (the prmt asm of ``_nf4_triton``), scaled by each 64-block's absmax in x's dtype
  (SCALE_VALUES numerics), stored as the group's two [BLOCK_N, 64] weight halves into a ring of wgmma-ready
  (NVMMA-swizzled) buffers;
- MMA (the default partition, one warpgroup): TMA copies of x's two 64-column halves of each group
  ([BLOCK_M, 64] each) into a ring, and per group two asynchronous wgmmas, weights [BLOCK_N, 64] times an x
  half transposed, both from shared memory, accumulating acc [BLOCK_N, BLOCK_M] (fp32) in registers; it keeps
  one group in flight and frees the stages of the one before. The epilogue stores acc transposed
  (y[m, n] = acc[n, m]), plus the bias.

The register file is shared: (4 + dequant_warps) warps at the kernel's register cap, after which the MMA
warps take 232 a thread (setmaxnreg) and the dequantizing warps the rest. A separate load warp would cost a
warpgroup of registers that 8 dequantizing warps do not leave.

Every weight stage has a ready and an empty mbarrier; x and code stages only a ready one (their consumer
refills them). Rows past N and columns past K come in as zeros (TMA), so their products vanish; rows of x
past M are never stored. x's row stride must be 16-byte aligned (TMA).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._launch import tma as tma_ok
from ._nf4_triton import _prmt_asm

_LOOKUP_BF16 = gl.constexpr(_prmt_asm(torch.bfloat16, immediates=True)[0])
_LOOKUP_FP16 = gl.constexpr(_prmt_asm(torch.float16, immediates=True)[0])


@gluon.jit
def _dequant_partition(codes_desc, bufs, bars, off_n, num_groups, absmax_ptr, N, stride_an):
    codes_bufs, _xh, _xl, wh_bufs, wl_bufs = bufs
    codes_ready, _x_ready, w_ready, w_empty = bars
    SC: gl.constexpr = codes_bufs.type.shape[0]
    SW: gl.constexpr = wh_bufs.type.shape[0]
    BLOCK_N: gl.constexpr = codes_bufs.type.shape[1]
    dtype: gl.constexpr = wh_bufs.dtype
    # 8 consecutive bytes of a row per thread (two 4-byte lookups), a row's 64 bytes over 8 threads
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    nbytes: gl.constexpr = codes_desc.block_type.nbytes
    for i in gl.static_range(SC):  # the first SC groups' codes
        first = i < num_groups
        mbarrier.expect(codes_ready.index(i), nbytes, pred=first)
        tma.async_copy_global_to_shared(codes_desc, [off_n, i * 64], codes_ready.index(i), codes_bufs.index(i),
                                        pred=first)
    rows = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    scale_ptrs = absmax_ptr + rows * stride_an
    live = rows < N
    a_hi = gl.load(scale_ptrs, mask=live, other=0.0)
    a_lo = gl.load(scale_ptrs + 1, mask=live, other=0.0)
    for g in range(num_groups):
        nxt = (g + 1 < num_groups) & live  # the next group's scales, in flight during this group's lookups
        n_hi = gl.load(scale_ptrs + 2 * g + 2, mask=nxt, other=0.0)
        n_lo = gl.load(scale_ptrs + 2 * g + 3, mask=nxt, other=0.0)
        c, cp = g % SC, (g // SC) & 1
        mbarrier.wait(codes_ready.index(c), cp)
        raw = codes_bufs.index(c).load(layout)
        fence_async_shared()  # the read above before the TMA that refills the stage with group g + SC
        refill = g + SC < num_groups
        mbarrier.expect(codes_ready.index(c), nbytes, pred=refill)
        tma.async_copy_global_to_shared(codes_desc, [off_n, (g + SC) * 64], codes_ready.index(c),
                                        codes_bufs.index(c), pred=refill)
        if dtype == gl.bfloat16:
            v_hi, v_lo = gl.inline_asm_elementwise(_LOOKUP_BF16, "=r,=r,=r,=r,r", [raw],
                                                   dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)
        else:
            v_hi, v_lo = gl.inline_asm_elementwise(_LOOKUP_FP16, "=r,=r,=r,=r,r", [raw],
                                                   dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
        w_hi = v_hi * a_hi.to(dtype)[:, None]
        w_lo = v_lo * a_lo.to(dtype)[:, None]
        s, sp = g % SW, (g // SW) & 1
        mbarrier.wait(w_empty.index(s), sp ^ 1)  # a fresh barrier counts as completed once: no wait
        wh_bufs.index(s).store(w_hi)
        wl_bufs.index(s).store(w_lo)
        fence_async_shared()  # the stores above before the wgmma (async proxy) reads them
        mbarrier.arrive(w_ready.index(s))
        a_hi, a_lo = n_hi, n_lo


@gluon.jit
def _load_x(x_desc, bufs, bars, off_m, g, stage, pred):
    _codes, xh_bufs, xl_bufs, _wh, _wl = bufs
    _codes_ready, x_ready, _w_ready, _w_empty = bars
    mbarrier.expect(x_ready.index(stage), 2 * x_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(x_desc, [off_m, g * 128], x_ready.index(stage), xh_bufs.index(stage), pred=pred)
    tma.async_copy_global_to_shared(x_desc, [off_m, g * 128 + 64], x_ready.index(stage), xl_bufs.index(stage),
                                    pred=pred)


@gluon.jit
def _mma_partition(x_desc, bufs, bars, off_n, off_m, num_groups, bias_ptr, y_ptr, M, N, stride_ym,
                   HAS_BIAS: gl.constexpr, num_warps: gl.constexpr):
    _codes, xh_bufs, xl_bufs, wh_bufs, wl_bufs = bufs
    _codes_ready, x_ready, w_ready, w_empty = bars
    SX: gl.constexpr = xh_bufs.type.shape[0]
    SW: gl.constexpr = wh_bufs.type.shape[0]
    BLOCK_M: gl.constexpr = xh_bufs.type.shape[1]
    BLOCK_N: gl.constexpr = wh_bufs.type.shape[1]
    for i in gl.static_range(SX):  # the first SX groups of x
        _load_x(x_desc, bufs, bars, off_m, i, i, i < num_groups)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_M, 16])
    acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=acc_layout)
    for g in range(num_groups):
        s, sp = g % SX, (g // SX) & 1
        t, tp = g % SW, (g // SW) & 1
        mbarrier.wait(w_ready.index(t), tp)
        mbarrier.wait(x_ready.index(s), sp)
        acc = warpgroup_mma(wh_bufs.index(t), xh_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(wl_bufs.index(t), xl_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=2, deps=(acc,))  # the group before is done: free its stages
        mbarrier.arrive(w_empty.index((g + SW - 1) % SW), pred=g > 0)
        _load_x(x_desc, bufs, bars, off_m, g - 1 + SX, (g + SX - 1) % SX, (g > 0) & (g - 1 + SX < num_groups))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))
    if HAS_BIAS:
        acc += gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[:, None]
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    gl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def nf4_ws_kernel(x_desc, codes_desc, absmax_ptr, bias_ptr, y_ptr, M, N, num_groups, stride_an, stride_ym,
                  w_layout: gl.constexpr, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, CODE_STAGES: gl.constexpr,
                  X_STAGES: gl.constexpr, W_STAGES: gl.constexpr, DEQUANT_WARPS: gl.constexpr,
                  DEQUANT_REGS: gl.constexpr, num_warps: gl.constexpr):
    """y[M, N] = x @ dequant(w).T (+ bias): one [BLOCK_M, BLOCK_N] tile of y per program (module docstring)."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = codes_desc.block_type.shape[0]
    pid = gl.program_id(0)
    grid_m = gl.cdiv(M, BLOCK_M)
    grid_n = gl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n  # GROUP_M row tiles walk the same weight rows while they sit in L2
    first_m = (pid // width) * GROUP_M
    size_m = gl.minimum(grid_m - first_m, GROUP_M)
    off_m = (first_m + (pid % width) % size_m) * BLOCK_M
    off_n = ((pid % width) // size_m) * BLOCK_N

    codes_bufs = gl.allocate_shared_memory(gl.uint8, [CODE_STAGES, BLOCK_N, 64], codes_desc.layout)
    xh_bufs = gl.allocate_shared_memory(x_desc.dtype, [X_STAGES, BLOCK_M, 64], x_desc.layout)
    xl_bufs = gl.allocate_shared_memory(x_desc.dtype, [X_STAGES, BLOCK_M, 64], x_desc.layout)
    wh_bufs = gl.allocate_shared_memory(x_desc.dtype, [W_STAGES, BLOCK_N, 64], w_layout)
    wl_bufs = gl.allocate_shared_memory(x_desc.dtype, [W_STAGES, BLOCK_N, 64], w_layout)
    codes_ready = gl.allocate_shared_memory(gl.int64, [CODE_STAGES, 1], mbarrier.MBarrierLayout())
    x_ready = gl.allocate_shared_memory(gl.int64, [X_STAGES, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
    w_empty = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(CODE_STAGES):
        mbarrier.init(codes_ready.index(i), count=1)
    for i in gl.static_range(X_STAGES):
        mbarrier.init(x_ready.index(i), count=1)
    for i in gl.static_range(W_STAGES):
        mbarrier.init(w_ready.index(i), count=1)
        mbarrier.init(w_empty.index(i), count=1)
    bufs = (codes_bufs, xh_bufs, xl_bufs, wh_bufs, wl_bufs)
    bars = (codes_ready, x_ready, w_ready, w_empty)
    gl.warp_specialize([
        (_mma_partition, (x_desc, bufs, bars, off_n, off_m, num_groups, bias_ptr, y_ptr, M, N, stride_ym,
                          HAS_BIAS, num_warps)),
        (_dequant_partition, (codes_desc, bufs, bars, off_n, num_groups, absmax_ptr, N, stride_an)),
    ], [DEQUANT_WARPS], [DEQUANT_REGS])


_GL = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def ws_ready(x: torch.Tensor) -> bool:
    """nf4_ws_kernel can take x: 16-bit, on a Hopper-or-newer GPU, its rows 16-byte aligned (TMA)."""
    return (x.is_cuda and x.dtype in _GL and tma_ok(x) and x.data_ptr() % 16 == 0
            and (x.stride(0) * x.element_size()) % 16 == 0)


def launch_ws(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None,
              y: torch.Tensor, block_m: int = 128, block_n: int = 128, group_m: int = 8, code_stages: int = 4,
              x_stages: int = 3, w_stages: int = 2, dequant_warps: int = 8) -> None:
    """y = x @ dequant(codes, absmax).T (+ bias) by nf4_ws_kernel; x bf16/fp16 [M, K] with a 16-byte aligned row
    stride, codes/absmax as NF4Weight holds them (K padded to 128)."""
    m, n = x.shape[0], codes.shape[0]
    dt = _GL[x.dtype]
    x_desc = TensorDescriptor.from_tensor(x, [block_m, 64], gl.NVMMASharedLayout.get_default_for([block_m, 64], dt))
    codes_desc = TensorDescriptor.from_tensor(codes, [block_n, 64],
                                              gl.NVMMASharedLayout.get_default_for([block_n, 64], gl.uint8))
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    # one register file: (MMA + dequantizing) warps at maxnreg each; then the MMA warps take mma_regs a thread
    # (fp32 acc: 128 registers, 64 x BLOCK_M per warpgroup) and the dequantizing warps the rest
    mma_warps = 8 if block_m >= 256 else 4
    mma_regs = 184 if mma_warps == 8 else 232
    warps = mma_warps + dequant_warps
    maxnreg = 65536 // (32 * warps) // 8 * 8
    dequant_regs = min(256, (maxnreg * warps - mma_regs * mma_warps) // dequant_warps // 8 * 8)
    nf4_ws_kernel[grid](
        x_desc, codes_desc, absmax, bias if bias is not None else y, y, m, n, codes.shape[1] // 64,
        absmax.stride(0), y.stride(0), gl.NVMMASharedLayout.get_default_for([block_n, 64], dt),
        HAS_BIAS=bias is not None, GROUP_M=group_m, CODE_STAGES=code_stages, X_STAGES=x_stages,
        W_STAGES=w_stages, DEQUANT_WARPS=dequant_warps, DEQUANT_REGS=dequant_regs, num_warps=mma_warps,
        maxnreg=maxnreg,
    )
