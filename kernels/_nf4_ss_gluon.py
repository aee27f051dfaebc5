"""The NF4 matmul at prefill sizes with both wgmma operands in shared memory (Gluon; Hopper only).

y^T = W @ x^T per program: BLOCK_N = 16 * num_warps weight rows (64 per MMA warpgroup) by BLOCK_M rows of x
(the MMA's N, up to 256). Two warp-specialized partitions share each program's shared memory:
- a lookup warpgroup keeps a CS-deep TMA ring of code bytes ([BLOCK_N, 64] a 128-column group) filled and turns
  each group into its two 64-column weight halves (the prmt lookup, _nf4_triton._prmt_asm, scaled by their absmax
  in x's dtype: the SCALE_VALUES rounding), stored into a WS-deep ring of [BLOCK_N, 64] tiles in wgmma's swizzled
  layout;
- the MMA warpgroups (the kernel's num_warps) keep an XS-deep TMA ring of x ([BLOCK_M, 64] a 64-column step),
  run one shared-shared wgmma a step and, once the previous step's has retired, hand its weight stage back and
  reload its x stage.
Weight stages pass by mbarriers (ready: stored and fenced; empty: read by the MMA), the TMA stages by their
transaction counts. The MMA warpgroups hold only their accumulator in registers, so they run cuBLAS's tile shapes
while the lookup runs in other warps. K splits into SPLIT_K slices of ITERS groups; with more than one, each
program stores its fp32 sums into part [SPLIT_K, M, N] for the reduce (or a LoRA finish hook).
"""

from __future__ import annotations

import os

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

from ._launch import pdl_args
from ._nf4_configs import Nf4Config, ss_tail_cols
from ._nf4_regs_gluon import _lookup, _pdl_chain, _store_tile, _table_words, _thread_ids, rows_aligned


@gluon.jit
def _ring(bars, i, n):
    """Ring stage and phase of the i-th use of an n-deep ring."""
    return bars.index(i % n), (i // n) & 1


@gluon.jit
def _lookup_ws(c_desc, c_s, w_s, c_ready, w_ready, w_empty, absmax_ptr, lut_ptr, N, n0, g0, iters, stride_an,
               CAST: gl.constexpr):
    """Lookup warpgroup: keeps its CS-deep ring of code bytes filled by TMA, and turns each group's bytes into its two
    weight halves (looked up, scaled by their absmax in x's dtype), stored into two stages of the weight ring once the
    MMA has released them (a fresh empty barrier passes its first round)."""
    CS: gl.constexpr = c_s.shape[0]
    WS: gl.constexpr = w_s.shape[0]
    BLOCK_N: gl.constexpr = w_s.shape[1]
    V_DTYPE: gl.constexpr = w_s.dtype
    LW: gl.constexpr = gl.num_warps()
    raw_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [LW, 1], [1, 0])
    tab = _table_words(lut_ptr, _thread_ids(LW))
    rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, raw_l))
    s_ptrs = absmax_ptr + rows * stride_an
    s_mask = rows < N
    for j in gl.static_range(CS):
        _codes(c_desc, c_s, c_ready, j, n0, g0, j < iters)
    for g in range(iters):
        s_hi = gl.load(s_ptrs + 2 * (g0 + g), mask=s_mask, other=0.0).to(V_DTYPE)
        s_lo = gl.load(s_ptrs + (2 * (g0 + g) + 1), mask=s_mask, other=0.0).to(V_DTYPE)
        bar, ph = _ring(c_ready, g, CS)
        mbarrier.wait(bar, ph)
        raw = c_s.index(g % CS).load(raw_l)
        fence_async_shared()  # the reads before TMA's writes into the same stage
        gl.thread_barrier()
        _codes(c_desc, c_s, c_ready, g + CS, n0, g0, g + CS < iters)
        if CAST:  # bench only: the bytes as values (wrong on purpose), what everything but the lookup costs
            v_hi = raw.to(V_DTYPE)
            v_lo = v_hi
        else:
            v_hi, v_lo = _lookup(raw, tab, V_DTYPE)
        v_hi = v_hi * s_hi[:, None]
        v_lo = v_lo * s_lo[:, None]
        bar, ph = _ring(w_empty, 2 * g, WS)
        mbarrier.wait(bar, ph ^ 1)
        w_s.index((2 * g) % WS).store(v_hi)
        bar, ph = _ring(w_empty, 2 * g + 1, WS)
        mbarrier.wait(bar, ph ^ 1)
        w_s.index((2 * g + 1) % WS).store(v_lo)
        fence_async_shared()  # the stores before the async proxy's reads (wgmma)
        gl.thread_barrier()  # the warpgroup's stores all done
        mbarrier.arrive(w_ready.index((2 * g) % WS), count=1)
        mbarrier.arrive(w_ready.index((2 * g + 1) % WS), count=1)


@gluon.jit
def _codes(c_desc, c_s, c_ready, g, n0, g0, ok):
    """TMA of the slice's group g's code bytes into its ring stage (nothing where not ok)."""
    CS: gl.constexpr = c_s.shape[0]
    bar = c_ready.index(g % CS)
    mbarrier.expect(bar, c_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(c_desc, [n0, (g0 + g) * 64], bar, c_s.index(g % CS), pred=ok)


@gluon.jit
def _x(x_desc, x_s, x_ready, t, m0, g0, ok):
    """TMA of the slice's 64-column step t of x into its ring stage (nothing where not ok)."""
    XS: gl.constexpr = x_s.shape[0]
    bar = x_ready.index(t % XS)
    mbarrier.expect(bar, x_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(x_desc, [m0, g0 * 128 + 64 * t], bar, x_s.index(t % XS), pred=ok)


@gluon.jit
def _mma(x_desc, w_s, x_s, w_ready, w_empty, x_ready, m0, g0, iters):
    """MMA warpgroups (the default partition): the slice's fp32 sums [BLOCK_N, BLOCK_M], one async wgmma a 64-column
    step; once the previous step's has retired, its weight stage goes back to the lookup and its x stage takes the
    step XS ahead (x's ring is this partition's own)."""
    WARPS: gl.constexpr = gl.num_warps()
    BLOCK_N: gl.constexpr = w_s.shape[1]
    BLOCK_M: gl.constexpr = x_s.shape[1]
    WS: gl.constexpr = w_s.shape[0]
    XS: gl.constexpr = x_s.shape[0]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    steps = 2 * iters
    for j in gl.static_range(XS):
        _x(x_desc, x_s, x_ready, j, m0, g0, j < steps)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
    for t in range(steps):
        bar, ph = _ring(w_ready, t, WS)
        mbarrier.wait(bar, ph)
        bar, ph = _ring(x_ready, t, XS)
        mbarrier.wait(bar, ph)
        acc = warpgroup_mma(w_s.index(t % WS), x_s.index(t % XS).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])  # step t - 1 retired: its stages are free
        gl.thread_barrier()
        mbarrier.arrive(w_empty.index((t + WS - 1) % WS), count=1, pred=t > 0)
        _x(x_desc, x_s, x_ready, t - 1 + XS, m0, g0, (t > 0) & (t - 1 + XS < steps))
    return (warpgroup_mma_wait(0, deps=[acc]),)  # warp_specialize's default partition returns a tuple


@gluon.jit
def _store(acc, bias_ptr, y_ptr, part_ptr, M, N, m0, n0, pid_k, stride_ym, HAS_BIAS: gl.constexpr,
           SPLIT_K: gl.constexpr):
    """y [m0:, n0:] = acc^T (+ bias), or acc^T into K slice pid_k of part."""
    BLOCK_N: gl.constexpr = acc.shape[0]
    BLOCK_M: gl.constexpr = acc.shape[1]
    out_l: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, gl.num_warps()], [0, 1])
    rn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_l))
    om = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out_l))
    _store_tile(gl.convert_layout(acc, out_l), rn, rn < N, om, M, N, pid_k, stride_ym, bias_ptr, y_ptr, part_ptr,
                HAS_BIAS, SPLIT_K)


@gluon.jit
def nf4_ss_kernel(x_desc, c_desc, absmax_ptr, lut_ptr, bias_ptr, y_ptr, part_ptr, M, N, N_BASE, NUM_G, stride_an,
                  stride_ym, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, ITERS: gl.constexpr, PDL: gl.constexpr,
                  CS: gl.constexpr, WS: gl.constexpr, XS: gl.constexpr, LOOKUP_REGS: gl.constexpr,
                  CAST: gl.constexpr):
    """y [M, N] (or its K slices' fp32 sums in part) = x [M, K] @ dequant(W).T (module docstring). A program
    covers BLOCK_N = 16 * num_warps weight rows from N_BASE on, BLOCK_M rows of x (x_desc's block) and one K slice."""
    WARPS: gl.constexpr = gl.num_warps()
    BLOCK_N: gl.constexpr = 16 * WARPS
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    V_DTYPE: gl.constexpr = x_desc.dtype
    if PDL:
        _pdl_chain(gl.zeros([1], gl.int32, gl.BlockedLayout([1], [32], [WARPS], [0])))
    m0 = gl.program_id(0) * BLOCK_M  # x's row tiles vary fastest: programs on the same weight rows run together
    n0 = N_BASE + gl.program_id(1) * BLOCK_N
    pid_k = gl.program_id(2)
    c_s = gl.allocate_shared_memory(gl.uint8, [CS, BLOCK_N, 64], c_desc.layout)
    x_s = gl.allocate_shared_memory(V_DTYPE, [XS, BLOCK_M, 64], x_desc.layout)
    w_s = gl.allocate_shared_memory(V_DTYPE, [WS, BLOCK_N, 64], gl.NVMMASharedLayout(128, 16))
    c_ready = gl.allocate_shared_memory(gl.int64, [CS, 1], mbarrier.MBarrierLayout())
    x_ready = gl.allocate_shared_memory(gl.int64, [XS, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [WS, 1], mbarrier.MBarrierLayout())
    w_empty = gl.allocate_shared_memory(gl.int64, [WS, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(CS):
        mbarrier.init(c_ready.index(j), count=1)
    for j in gl.static_range(XS):
        mbarrier.init(x_ready.index(j), count=1)
    for j in gl.static_range(WS):
        mbarrier.init(w_ready.index(j), count=1)
        mbarrier.init(w_empty.index(j), count=1)
    fence_async_shared()
    g0 = pid_k * ITERS
    iters = gl.minimum(g0 + ITERS, NUM_G) - g0
    (acc,) = gl.warp_specialize([
        (_mma, (x_desc, w_s, x_s, w_ready, w_empty, x_ready, m0, g0, iters)),
        (_lookup_ws, (c_desc, c_s, w_s, c_ready, w_ready, w_empty, absmax_ptr, lut_ptr, N, n0, g0, iters, stride_an,
                      CAST)),
    ], [4], [LOOKUP_REGS])
    _store(acc, bias_ptr, y_ptr, part_ptr, M, N, m0, n0, pid_k, stride_ym, HAS_BIAS, SPLIT_K)


def ss_fit(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether nf4_ss_kernel takes x @ the weight of `codes`: rows_aligned (for its TMA descriptors), on Hopper
    (sm_90)."""
    return rows_aligned(x, codes) and torch.cuda.get_device_capability(x.device)[0] == 9


# Code, weight and x ring stages (CS, WS, XS; HOTLORA_NF4_SS_RINGS="cs,ws,xs" for bench/nf4_ss.py): 2, 4, 4 take 208 KB
# at 256x128 (one program per SM). On the H200 (thirty-fourth session) 2, 8, 4 and 4, 8, 4 at 256x64 were within the
# run-to-run spread of it (gate/up 231-252 us at M = 512); 256x128 cannot hold 8 weight stages.
SS_RINGS = (2, 4, 4)
# The lookup warpgroup's registers, and the kernel's cap by MMA warps: with 8 the program has 12 (384 threads, at most
# 168 registers a thread at launch), with 4 it has 8 (240); the MMA warpgroups' 64x256 fp32 accumulator needs ~154
# (ptxas: a 16-warp program capped at 128 cannot compile its wgmma). At 120 the lookup's loop spilled 4 registers
# (sm_90 SASS); at 128 none. The 4-warp program capped at 168 spilled 16-80 bytes.
SS_REGS = (128, {8: 168, 4: 240})


def launch_ss(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor,
              bias: torch.Tensor | None, y: torch.Tensor, cfg: Nf4Config) -> torch.Tensor | None:
    """nf4_ss_kernel writing y, or (split K) its fp32 sums [split, M, N], returned for the reduce or a finish
    hook (hotlora.kernels.nf4: the layout of codes and absmax; lut: prmt_table_words of x's dtype).

    One program per SM at a time: a grid of 1.4 waves takes two waves' time. With 128 weight rows a program and one
    slice, a last wave at most half full goes to a second launch of 64-row programs (one MMA warpgroup each, ~0.6
    of the time) over the output columns the full waves leave (HOTLORA_NF4_SS_TAIL=0: one launch)."""
    m, n, split = x.shape[0], codes.shape[0], cfg.split_k
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    rows, cols = triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n)
    full = ss_tail_cols(rows, cols, torch.cuda.get_device_properties(x.device).multi_processor_count)
    tail = split == 1 and cfg.warps == 8 and full and os.environ.get("HOTLORA_NF4_SS_TAIL") != "0"
    _launch_part(x, codes, absmax, lut, bias, y, part, cfg.block_m, cfg.warps, 0, full if tail else cols, split)
    if tail:
        n0 = full * cfg.block_n
        _launch_part(x, codes, absmax, lut, bias, y, part, cfg.block_m, 4, n0, triton.cdiv(n - n0, 64), 1)
    return part if split > 1 else None


def _launch_part(x, codes, absmax, lut, bias, y, part, block_m: int, warps: int, n_base: int, cols: int,
                 split: int) -> None:
    """nf4_ss_kernel over `cols` tiles of 16 * warps weight rows from n_base on."""
    m, groups, block_n = x.shape[0], codes.shape[1] // 64, 16 * warps
    el = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    x_desc = TensorDescriptor.from_tensor(x, [block_m, 64], gl.NVMMASharedLayout.get_default_for([block_m, 64], el))
    c_desc = TensorDescriptor.from_tensor(codes, [block_n, 64], gl.NVMMASharedLayout.get_default_for(
        [block_n, 64], gl.uint8))
    cs, ws, xs = (int(v) for v in os.environ.get("HOTLORA_NF4_SS_RINGS", ",".join(map(str, SS_RINGS))).split(","))
    nf4_ss_kernel[(triton.cdiv(m, block_m), cols, split)](
        x_desc, c_desc, absmax, lut, bias if bias is not None else y, y, part, m, codes.shape[0], n_base, groups,
        absmax.stride(0), y.stride(0), HAS_BIAS=bias is not None, SPLIT_K=split, ITERS=triton.cdiv(groups, split),
        CS=cs, WS=ws, XS=xs, LOOKUP_REGS=SS_REGS[0], CAST=os.environ.get("HOTLORA_NF4_SS_CAST") == "1",
        num_warps=warps, maxnreg=SS_REGS[1][warps], **pdl_args(x),
    )
