"""The NF4 matmul at decode sizes with the looked-up weights as the MMA's register operand (Gluon; CUDA only).

nf4_matmul_kernel (Triton) leaves the dequantized tile's layout to the compiler, which moves it into the layout
tl.dot wants: in sm_90 SASS that is ~40 register moves and shared-memory reads per 64 weight values a thread, on
top of the lookup. Here the layouts are explicit: each thread reads the code bytes that its part of an mma.sync
A operand needs (two 8-byte runs of two rows per 64-column half), the prmt lookup (_nf4_triton._prmt_asm) turns
them into the operand's registers in place, and x's [64, BLOCK_M] halves are read in the B operand's layout. With
k_width 8 a thread's run of 8 bytes is 8 consecutive k of the operand, so neither side is shuffled: the loop is
~3.7 sm_90 instructions per weight value at M <= 8 against the tl.dot kernel's ~5.3 (bench/nf4_sass.py), with no shared
memory between the lookup and the MMA.

Computes y^T = W @ x^T: weight rows are the MMA's M (16 per warp and tile), x's rows its N (8 per instruction). Each
128-column group's two 64-blocks (high and low nibbles) go to separate MMAs, whose fp32 sums are scaled by their
absmax and added up (SCALE_PARTIALS, the rounding of nf4_matmul_kernel at decode sizes). The code bytes and x travel
by cp.async through STAGES-group shared-memory rings, the scales by plain loads one group ahead. Under PDL the first
fill's code bytes, the table and the first scales are asked for before the wait (the kernel before does not write
them), so their latency hides behind the kernel before; x's copies follow the wait. K splits into SPLIT_K slices of
ITERS groups; with more than one, each program stores its fp32 sums into part [SPLIT_K, M, N] for the reduce (or a
LoRA finish hook).

The group steps are unrolled (_pipelined): every stage index is static and every stage its own allocation, so one CTA
barrier a group suffices (with one ring allocation indexed at run time, the barrier pass added a second before each
copy); slices of at most UNROLL_ITERS groups (the served ones) are straight-line code, which ptxas fits in 80 registers
at 8 x-rows (6 programs per SM; 114 at 16, 4 per SM), against 104 for the same 8-row steps in a loop. Where the shape
tiles evenly (EVEN) no copy or scale load carries a row or K mask: x's rows past M repeat its last row, whose products
no store keeps. HOTLORA_NF4_REGS_UNROLL sets UNROLL_ITERS (0: always a loop; bench A/B only). PROBE_BITS (bench only,
bench/nf4_gemm.py --probes) runs the kernel without its lookup (PROBE_CAST), without streaming after the rings' first
fill (PROBE_NO_STREAM), or both: what the bytes alone, and the work alone, cost at the same grid; with PROBE_NO_X only
the code bytes stream after the first fill (what x's copies cost); PROBE_HOT_SCALES keeps every scale load but reads the
same 16 rows' scales in every program (what the scales' bytes cost); and with PROBE_LATE_PDL it lets the next kernel be
scheduled after its store instead of at its start.

The prmt lookup is ~2.4 ALU instructions a weight value (152 a group and thread in sm_90 SASS since the thirty-ninth
session's xor merge, 168 before), and the ALU pipe bounds this kernel (ncu, BENCHMARKS.md, thirty-fifth session).
Reading each code byte's two values from a 256-word table in shared memory instead (one byte extract, one address IMAD
and one conflict-free LDS a byte; 32 KB a program, 4 programs per SM) lost 1.2-1.5x on the H200 (thirty-sixth session)
and was taken out.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from ._launch import pdl_args
from ._nf4_configs import Nf4Config
from ._nf4_triton import _PRMT_BF16, _PRMT_CONSTRAINTS, _PRMT_FP16, _TABLE_COPY


@gluon.jit
def _table_words(lut_ptr, tid):
    """The prmt lookup's nine table words (lut: prmt_table_words, two copies _TABLE_COPY apart): odd and even
    threads read different copies, so ptxas keeps them in ordinary registers (_nf4_triton._prmt_table)."""
    base = lut_ptr + (tid & 1) * _TABLE_COPY
    return (gl.sum(gl.load(base), axis=0), gl.sum(gl.load(base + 1), axis=0), gl.sum(gl.load(base + 2), axis=0),
            gl.sum(gl.load(base + 3), axis=0), gl.sum(gl.load(base + 4), axis=0), gl.sum(gl.load(base + 5), axis=0),
            gl.sum(gl.load(base + 6), axis=0), gl.sum(gl.load(base + 7), axis=0), gl.sum(gl.load(base + 8), axis=0))


# PROBE bits (bench only: bench/nf4_gemm.py --probes sets PROBE_BITS, which launch_regs passes): the lookup replaced
# by the code bytes' bits as values (CAST: no ALU work, wrong on purpose), and no copies after the rings' first fill
# (NO_STREAM: the steps reread stale stages)
PROBE_CAST = gl.constexpr(1)
PROBE_NO_STREAM = gl.constexpr(2)
PROBE_LATE_PDL = gl.constexpr(4)  # let the next kernel be scheduled only after the store, not at the start
PROBE_NO_X = gl.constexpr(8)  # x copied in the rings' first fill only (the steps reread stale x; the codes stream)
PROBE_HOT_SCALES = gl.constexpr(16)  # every program reads the scales of rows 0-15 (cache-resident: loads, no bytes)
PROBE_BITS = 0
_CAST_ASM = gl.constexpr("mov.b32 $0, $4; mov.b32 $1, $4; mov.b32 $2, $4; mov.b32 $3, $4;")


@gluon.jit
def _lookup(raw, tab, V_DTYPE: gl.constexpr):
    """The values of the high and low nibbles of raw's bytes, in x's dtype, by prmt against the table words in
    registers (_nf4_triton._prmt_asm; tab: _table_words)."""
    args = [raw, tab[0], tab[1], tab[2], tab[3], tab[4], tab[5], tab[6], tab[7], tab[8]]
    if gl.bfloat16 == V_DTYPE:
        hi, lo = gl.inline_asm_elementwise(_PRMT_BF16, _PRMT_CONSTRAINTS, args, dtype=(gl.bfloat16, gl.bfloat16),
                                           is_pure=True, pack=4)
    else:
        hi, lo = gl.inline_asm_elementwise(_PRMT_FP16, _PRMT_CONSTRAINTS, args, dtype=(gl.float16, gl.float16),
                                           is_pure=True, pack=4)
    return hi, lo


@gluon.jit
def _thread_ids(WARPS: gl.constexpr):
    """Each thread's %tid.x, as a [1] tensor held by all 32 * WARPS threads."""
    return gl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [gl.zeros([1], gl.int32, gl.BlockedLayout(
        [1], [32], [WARPS], [0]))], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _pdl_wait(tid):
    """Wait for the kernel before this one (hotlora.kernels._launch; tid: any per-thread value, _thread_ids')."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0 $1", "=r,r", [tid], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _pdl_trigger(tid):
    """Let the next kernel be scheduled (tid: any per-thread value, _thread_ids')."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0 $1", "=r,r", [tid], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _pdl_chain(tid):
    """_pdl_wait, then _pdl_trigger."""
    _pdl_wait(tid)
    _pdl_trigger(tid)


@gluon.jit
def _store_tile(acc, rn, rmask, om, M, N, pid_k, stride_ym, bias_ptr, y_ptr, part_ptr, HAS_BIAS: gl.constexpr,
                SPLIT_K: gl.constexpr):
    """A program's sums acc [BLOCK_N, BLOCK_M] (weight rows rn, valid where rmask; x rows om) as y[om, rn] (+ bias),
    or as K slice pid_k of part [SPLIT_K, M, N] (fp32)."""
    mask = rmask[:, None] & (om[None, :] < M)
    if SPLIT_K > 1:
        gl.store(part_ptr + (pid_k * M + om[None, :]) * N + rn[:, None], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc = acc + gl.load(bias_ptr + rn, mask=rmask, other=0.0).to(gl.float32)[:, None]
        gl.store(y_ptr + om[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _accumulate(acc, group, zero, tab, a_op: gl.constexpr, b_op: gl.constexpr, V_DTYPE: gl.constexpr,
                PROBE: gl.constexpr):
    """acc + the group's two 64-blocks' MMAs, each scaled by its absmax."""
    raw, x_hi, x_lo, s_hi, s_lo = group
    if PROBE & PROBE_CAST:
        types: gl.constexpr = (gl.bfloat16, gl.bfloat16) if gl.bfloat16 == V_DTYPE else (gl.float16, gl.float16)
        v_hi, v_lo = gl.inline_asm_elementwise(_CAST_ASM, "=r,=r,=r,=r,r", [raw], dtype=types, is_pure=True, pack=4)
    else:
        v_hi, v_lo = _lookup(raw, tab, V_DTYPE)
    p_hi = mma_v2(gl.convert_layout(v_hi, a_op), gl.convert_layout(x_hi, b_op), zero)
    p_lo = mma_v2(gl.convert_layout(v_lo, a_op), gl.convert_layout(x_lo, b_op), zero)
    return acc + p_hi * s_hi[:, None] + p_lo * s_lo[:, None]


@gluon.jit
def _issue(w_s, x_s, cw_ptrs, cw_rows, cx_ptrs, cx_rows, cxk, g, g_end, K, EVEN: gl.constexpr, X: gl.constexpr = True,
           W: gl.constexpr = True, COMMIT: gl.constexpr = True):
    """cp.async group g's code bytes (W) and x's [128, BLOCK_M] (X) into a stage of the rings (w_s, x_s), then commit
    (zeros past N, M, K and g_end; where EVEN, past g_end only: no row is past N and x's rows past M repeat its
    last). Without COMMIT the next _issue's commit takes the copies along."""
    if W:
        async_copy.async_copy_global_to_shared(w_s, cw_ptrs + g * 64, mask=cw_rows & (g < g_end))
    if X:
        x_mask = cx_rows & (g < g_end) if EVEN else cx_rows & (cxk < K - g * 128) & (g < g_end)
        async_copy.async_copy_global_to_shared(x_s, cx_ptrs + g * 128, mask=x_mask)
    if COMMIT:
        async_copy.commit_group()


UNROLL_ITERS = gl.constexpr(int(os.environ.get("HOTLORA_NF4_REGS_UNROLL", "16")))  # groups (module docstring)


@gluon.jit
def _ring(dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr, STAGES: gl.constexpr):
    """STAGES shared-memory buffers of `shape`, one allocation each, so that the barrier pass tells the stages
    apart (it guards whole allocations)."""
    gl.static_assert(STAGES >= 2 and STAGES <= 4, "the regs kernel's rings have 2-4 stages")
    a = gl.allocate_shared_memory(dtype, shape, layout)
    b = gl.allocate_shared_memory(dtype, shape, layout)
    if STAGES == 2:  # constexpr branches: only the taken one allocates
        ring = (a, b)
    elif STAGES == 3:
        ring = (a, b, gl.allocate_shared_memory(dtype, shape, layout))
    else:
        ring = (a, b, gl.allocate_shared_memory(dtype, shape, layout), gl.allocate_shared_memory(dtype, shape, layout))
    return ring


@gluon.jit
def _scales(s_ptrs, s_mask, g, g_end, EVEN: gl.constexpr):
    """Group g's two 64-blocks' absmax [BLOCK_N] (zeros past N and g_end)."""
    ok = (g < g_end) if EVEN else s_mask & (g < g_end)
    return gl.load(s_ptrs + 2 * g, mask=ok, other=0.0), gl.load(s_ptrs + (2 * g + 1), mask=ok, other=0.0)


@gluon.jit
def _step(acc, scales, ctx, j: gl.constexpr, g, w_l: gl.constexpr, x_l: gl.constexpr, a_op: gl.constexpr,
          b_op: gl.constexpr, V_DTYPE: gl.constexpr, STAGES: gl.constexpr, EVEN: gl.constexpr, PROBE: gl.constexpr):
    """One group g from ring stage j: wait for it, read it into the operand layouts, copy group g + STAGES - 1
    into the stage read last step, load the next group's scales, and add this group's MMAs to acc (ctx: what every
    step of _pipelined shares)."""
    w_s, x_s, cw_ptrs, cw_rows, cx_ptrs, cx_rows, cxk, g_end, K, zero, tab, s_ptrs, s_mask = ctx
    async_copy.wait_group(STAGES - 2)
    gl.thread_barrier()  # every thread's copies of group g landed; every thread done with group g - 1's stage
    raw = w_s[j].load(w_l)
    x_hi = x_s[j].slice(0, 64, dim=0).load(x_l)
    x_lo = x_s[j].slice(64, 64, dim=0).load(x_l)
    s_hi, s_lo = scales
    scales = _scales(s_ptrs, s_mask, g + 1, g_end, EVEN)
    last: gl.constexpr = (j + STAGES - 1) % STAGES
    if not PROBE & PROBE_NO_STREAM:
        _issue(w_s[last], x_s[last], cw_ptrs, cw_rows, cx_ptrs, cx_rows, cxk, g + STAGES - 1, g_end, K, EVEN,
               not PROBE & PROBE_NO_X)
    return _accumulate(acc, (raw, x_hi, x_lo, s_hi, s_lo), zero, tab, a_op, b_op, V_DTYPE, PROBE), scales


@gluon.jit
def _pipelined(zero, tab, tid, w_ptr, x_ptr, s_ptrs, s_mask, pid_n, g0, g_end, M, N, K, stride_xm, stride_wn,
               w_l: gl.constexpr, x_l: gl.constexpr, a_op: gl.constexpr, b_op: gl.constexpr, V_DTYPE: gl.constexpr,
               BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, ITERS: gl.constexpr, STAGES: gl.constexpr,
               EVEN: gl.constexpr, PDL: gl.constexpr, PROBE: gl.constexpr):
    """The K loop's fp32 sums [BLOCK_N, BLOCK_M], with the code bytes and x copied STAGES - 1 groups ahead
    (cp.async into shared-memory rings, one commit group per group), each group read back into the operand layouts
    after a CTA barrier; the scales come by plain loads one group ahead. ITERS <= UNROLL_ITERS groups run as
    straight-line steps, more as a loop unrolled by STAGES and the remainder after it (module docstring)."""
    WARPS: gl.constexpr = gl.num_warps()
    cw_l: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [WARPS, 1], [1, 0])
    cx_l: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, WARPS], [0, 1])
    w_s = _ring(gl.uint8, [BLOCK_N, 64], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]), STAGES)
    x_s = _ring(V_DTYPE, [128, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [0, 1]), STAGES)
    rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, cw_l))
    cw_ptrs = w_ptr + rows[:, None] * stride_wn + gl.arange(0, 64, layout=gl.SliceLayout(0, cw_l))[None, :]
    cxk = gl.arange(0, 128, layout=gl.SliceLayout(1, cx_l))[:, None]
    xm = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, cx_l))[None, :]
    if EVEN:  # no mask but g_end's
        cw_rows = gl.full([BLOCK_N, 64], True, gl.int1, cw_l)
        cx_rows = gl.full([128, BLOCK_M], True, gl.int1, cx_l)
        cx_ptrs = x_ptr + gl.minimum(xm, M - 1) * stride_xm + cxk
    else:
        cw_rows = rows[:, None] < N
        cx_rows = xm < M
        cx_ptrs = x_ptr + xm * stride_xm + cxk
    scales = _scales(s_ptrs, s_mask, g0, g_end, EVEN)
    for j in gl.static_range(STAGES - 1):  # the first fill's code bytes: the kernel before does not write them
        _issue(w_s[j], x_s[j], cw_ptrs, cw_rows, cx_ptrs, cx_rows, cxk, g0 + j, g_end, K, EVEN, X=False, COMMIT=False)
    if PDL:  # x may be the kernel before's output
        _pdl_wait(tid)
        if not PROBE & PROBE_LATE_PDL:
            _pdl_trigger(tid)
    for j in gl.static_range(STAGES - 1):  # x's, each committed with its group's codes
        _issue(w_s[j], x_s[j], cw_ptrs, cw_rows, cx_ptrs, cx_rows, cxk, g0 + j, g_end, K, EVEN, W=False)
    acc = zero
    ctx = (w_s, x_s, cw_ptrs, cw_rows, cx_ptrs, cx_rows, cxk, g_end, K, zero, tab, s_ptrs, s_mask)
    if ITERS <= UNROLL_ITERS:  # straight-line code: no loop for ptxas to pipeline across, fewer registers
        for i in gl.static_range(ITERS):
            acc, scales = _step(acc, scales, ctx, i % STAGES, g0 + i, w_l, x_l, a_op, b_op, V_DTYPE, STAGES, EVEN,
                                PROBE)
    else:
        for i0 in range(0, ITERS - ITERS % STAGES, STAGES):
            for j in gl.static_range(STAGES):
                acc, scales = _step(acc, scales, ctx, j, g0 + i0 + j, w_l, x_l, a_op, b_op, V_DTYPE, STAGES, EVEN,
                                    PROBE)
        for j in gl.static_range(ITERS % STAGES):  # the last groups: ITERS is no multiple of STAGES
            acc, scales = _step(acc, scales, ctx, j, g0 + ITERS - ITERS % STAGES + j, w_l, x_l, a_op, b_op, V_DTYPE,
                                STAGES, EVEN, PROBE)
    async_copy.wait_group(0)
    return acc


@gluon.jit
def nf4_regs_kernel(x_ptr, w_ptr, absmax_ptr, lut_ptr, bias_ptr, y_ptr, part_ptr, M, N, K, NUM_G, stride_xm,
                    stride_wn, stride_an, stride_ym, HAS_BIAS: gl.constexpr, V_DTYPE: gl.constexpr,
                    BLOCK_M: gl.constexpr, TILES: gl.constexpr, SPLIT_K: gl.constexpr, ITERS: gl.constexpr,
                    PDL: gl.constexpr, STAGES: gl.constexpr, EVEN: gl.constexpr, PROBE: gl.constexpr):
    """y [M, N] (or its K slices' fp32 sums in part) = x [M, K] @ dequant(W).T for M <= BLOCK_M (module docstring).
    A program covers BLOCK_N = 16 * TILES * num_warps weight rows and one K slice; x's rows and the codes' rows
    are 16-byte aligned (regs_fit)."""
    WARPS: gl.constexpr = gl.num_warps()
    BLOCK_N: gl.constexpr = 16 * TILES * WARPS
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    a_op: gl.constexpr = gl.DotOperandLayout(0, mma, 8)
    b_op: gl.constexpr = gl.DotOperandLayout(1, mma, 8)
    w_l: gl.constexpr = gl.to_linear_layout(a_op, [BLOCK_N, 64])
    x_l: gl.constexpr = gl.to_linear_layout(b_op, [64, BLOCK_M])
    row_l: gl.constexpr = gl.SliceLayout(1, mma)
    col_l: gl.constexpr = gl.SliceLayout(0, mma)

    tid = _thread_ids(WARPS)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    tab = _table_words(lut_ptr, tid)

    srows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=row_l)
    if PROBE & PROBE_HOT_SCALES:  # noqa: SIM108 (a static branch: Triton's ternary would build both sides)
        s_ptrs = absmax_ptr + (srows % 16) * stride_an
    else:
        s_ptrs = absmax_ptr + srows * stride_an
    s_mask = srows < N

    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
    g0 = pid_k * ITERS
    acc = _pipelined(zero, tab, tid, w_ptr, x_ptr, s_ptrs, s_mask, pid_n, g0, gl.minimum(g0 + ITERS, NUM_G), M, N,
                     K, stride_xm, stride_wn, w_l, x_l, a_op, b_op, V_DTYPE, BLOCK_N, BLOCK_M, ITERS, STAGES, EVEN,
                     PDL, PROBE)

    _store_tile(acc, srows, s_mask, gl.arange(0, BLOCK_M, layout=col_l), M, N, pid_k, stride_ym, bias_ptr, y_ptr,
                part_ptr, HAS_BIAS, SPLIT_K)
    if PDL and PROBE & PROBE_LATE_PDL:
        _pdl_trigger(tid)


def rows_aligned(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """CUDA, 16-bit x, and 16-byte aligned rows of x and of the codes (what the Gluon kernels' cp.async and TMA
    copies need)."""
    return (x.is_cuda and x.dtype != torch.float32 and x.data_ptr() % 16 == 0 and x.stride(0) % 8 == 0
            and codes.data_ptr() % 16 == 0 and codes.stride(0) % 16 == 0)


def regs_fit(x: torch.Tensor, codes: torch.Tensor, cfg: Nf4Config) -> bool:
    """Whether nf4_regs_kernel takes x @ the weight of `codes` under `cfg`: M <= block_m, rows_aligned."""
    return x.shape[0] <= cfg.block_m and rows_aligned(x, codes)


def launch_regs(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor,
                bias: torch.Tensor | None, y: torch.Tensor, cfg: Nf4Config) -> torch.Tensor | None:
    """nf4_regs_kernel writing y, or (split K) its fp32 sums [split, M, N], returned for the reduce or a finish
    hook (hotlora.kernels.nf4: the layout of codes and absmax; lut: prmt_table_words in x's dtype, whatever
    lookup cfg names: this kernel has only the prmt one)."""
    m, k = x.shape
    n, split = codes.shape[0], cfg.split_k
    groups = codes.shape[1] // 64
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    nf4_regs_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, codes, absmax, lut, bias if bias is not None else y, y, part, m, n, k, groups, x.stride(0),
        codes.stride(0), absmax.stride(0), y.stride(0), HAS_BIAS=bias is not None,
        V_DTYPE=gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16, BLOCK_M=cfg.block_m,
        TILES=cfg.block_n // (16 * cfg.warps), SPLIT_K=split, ITERS=triton.cdiv(groups, split), STAGES=cfg.stages,
        EVEN=cfg.even and n % cfg.block_n == 0 and k == groups * 128, PROBE=PROBE_BITS,
        num_warps=cfg.warps, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}), **pdl_args(x),
    )
    return part if split > 1 else None
