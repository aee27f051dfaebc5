"""nf4_regs_kernel with no CTA barrier a group: each warp streams its own code rows (Gluon; CUDA only; bench and
tests until timed on a GPU, Nf4Config.own_rows).

nf4_regs_kernel (_nf4_regs_gluon) copies each group's code bytes and x through rings that all its warps share, so
every group step starts with a CTA barrier: the four warps move in lockstep, and a warp that its SM sub-partition
delays holds the other three back. Here the rings carry no shared data:
- x's K slice ([ITERS * 128, BLOCK_M]) is copied once, at the start, behind the kernel's only CTA barrier;
- warp w reads only weight rows 16w..16w+15 of the tile (the MMA's A operand for 4 warps by 64 rows), so it copies
  only those rows, into its own part of each ring stage, and waits only for its own copies (cp.async.wait_group,
  then a warp barrier).
The barrier pass would still put a CTA barrier between a ring stage's reads and the next copy into it (it guards
whole allocations), so the code copies, commits and waits are inline PTX, which it does not see. The asm addresses
the code ring from the kernel's shared memory base (global_smem) at W_OFF: Triton's allocator places the larger of
the two buffers at 0 and the other right after it (sizes may not tie; ring_offset, and the sm_90 compile test checks
the offsets). Everything else (lookup, MMAs, scales, store) is nf4_regs_kernel's.

Shared memory: STAGES * 4 KB of codes plus ITERS * 128 * BLOCK_M * 2 bytes of x (16 KB for gate/up's 8-group
slices at M <= 8, 28 KB for down's 14).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from ._launch import pdl_args
from ._nf4_configs import Nf4Config
from ._nf4_regs_gluon import _accumulate, _pdl_chain, _scales, _store_tile, _table_words, _thread_ids

_COMMIT = gl.constexpr("cp.async.commit_group; // $0 $1")
_WAIT_ALL = gl.constexpr("cp.async.wait_group 0; // $0 $1")
# a step's wait: all but this thread's newest STAGES - 2 commit groups landed, then the warp's (2-4 stages)
_WAIT_STEP_0 = gl.constexpr("cp.async.wait_group 0; bar.warp.sync -1; // $0 $1")
_WAIT_STEP_1 = gl.constexpr("cp.async.wait_group 1; bar.warp.sync -1; // $0 $1")
_WAIT_STEP_2 = gl.constexpr("cp.async.wait_group 2; bar.warp.sync -1; // $0 $1")


@gluon.jit
def _per_thread(asm: gl.constexpr, tid):
    """An asm statement ("... // $0 $1") once in each thread (tid: _thread_ids')."""
    gl.inline_asm_elementwise(asm, "=r,r", [tid], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _copy_codes(smem, ptrs, ok, tid):
    """cp.async.cg of 16 code bytes per element from ptrs to the shared-window address smem (zeros where not ok),
    then one commit group a thread."""
    size = gl.where(ok, 16, 0)
    gl.inline_asm_elementwise("cp.async.cg.shared.global [$1], [$2], 16, $3; // $0", "=r,r,l,r", [smem, ptrs, size],
                              dtype=gl.int32, is_pure=False, pack=1)
    _per_thread(_COMMIT, tid)


@gluon.jit
def _own_step(acc, scales, ctx, j: gl.constexpr, i: gl.constexpr, g, w_l: gl.constexpr, x_l: gl.constexpr,
              a_op: gl.constexpr, b_op: gl.constexpr, V_DTYPE: gl.constexpr, STAGES: gl.constexpr,
              EVEN: gl.constexpr):
    """Group g (the slice's i-th) from ring stage j: wait for this thread's copies of it, then for the warp's, read
    the warp's rows and x's group into the operand layouts, copy group g + STAGES - 1's rows into the stage read last
    step, load the next group's scales, and add this group's MMAs to acc."""
    w_s, x_s, c_smem, c_ptrs, c_rows, g_end, zero, tab, s_ptrs, s_mask, tid = ctx
    BLOCK_N: gl.constexpr = w_s.shape[1]
    if STAGES == 2:
        _per_thread(_WAIT_STEP_0, tid)
    elif STAGES == 3:
        _per_thread(_WAIT_STEP_1, tid)
    else:
        _per_thread(_WAIT_STEP_2, tid)
    raw = w_s.index(j).load(w_l)
    x_hi = x_s.slice(i * 128, 64, dim=0).load(x_l)
    x_lo = x_s.slice(i * 128 + 64, 64, dim=0).load(x_l)
    s_hi, s_lo = scales
    scales = _scales(s_ptrs, s_mask, g + 1, g_end, EVEN)
    last: gl.constexpr = (j + STAGES - 1) % STAGES
    _copy_codes(c_smem + last * BLOCK_N * 64, c_ptrs + (g + STAGES - 1) * 64, c_rows & (g + STAGES - 1 < g_end), tid)
    return _accumulate(acc, (raw, x_hi, x_lo, s_hi, s_lo), zero, tab, a_op, b_op, V_DTYPE, 0), scales


@gluon.jit
def _x_slice(x_s, x_ptr, M, K, g0, g_end, stride_xm, BLOCK_M: gl.constexpr, EVEN: gl.constexpr):
    """cp.async of x's K slice into x_s ([X_GROUPS * 128, BLOCK_M], k fastest) as one copy and one commit group (zeros
    past M, K and g_end; where EVEN, x's rows past M repeat its last). One copy, not one a group: the barrier pass
    puts a CTA barrier between two copies into the same buffer."""
    WARPS: gl.constexpr = gl.num_warps()
    ROWS: gl.constexpr = x_s.shape[0]
    cx_l: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, WARPS], [0, 1])
    kk = gl.arange(0, ROWS, layout=gl.SliceLayout(1, cx_l))[:, None]
    xm = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, cx_l))[None, :]
    if EVEN:
        ptrs = x_ptr + gl.minimum(xm, M - 1) * stride_xm + g0 * 128 + kk
        mask = (kk < (g_end - g0) * 128) & (xm >= 0)
    else:
        ptrs = x_ptr + xm * stride_xm + g0 * 128 + kk
        mask = (kk < (g_end - g0) * 128) & (kk < K - g0 * 128) & (xm < M)
    async_copy.async_copy_global_to_shared(x_s, ptrs, mask=mask)
    async_copy.commit_group()


@gluon.jit
def nf4_regs_own_kernel(x_ptr, w_ptr, absmax_ptr, lut_ptr, bias_ptr, y_ptr, part_ptr, M, N, K, NUM_G, stride_xm,
                        stride_wn, stride_an, stride_ym, HAS_BIAS: gl.constexpr, V_DTYPE: gl.constexpr,
                        BLOCK_M: gl.constexpr, SPLIT_K: gl.constexpr, ITERS: gl.constexpr, PDL: gl.constexpr,
                        STAGES: gl.constexpr, EVEN: gl.constexpr, X_GROUPS: gl.constexpr, W_OFF: gl.constexpr):
    """nf4_regs_kernel's y (or K slices' sums in part) for one tile of BLOCK_N = 16 * num_warps weight rows (one MMA
    tile a warp) and one K slice of at most ITERS groups (straight-line steps), the warps streaming their own rows
    (module docstring). X_GROUPS: ITERS rounded up to a power of two (shared memory shapes must be); W_OFF: the
    code ring's offset (ring_offset)."""
    WARPS: gl.constexpr = gl.num_warps()
    BLOCK_N: gl.constexpr = 16 * WARPS
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    a_op: gl.constexpr = gl.DotOperandLayout(0, mma, 8)
    b_op: gl.constexpr = gl.DotOperandLayout(1, mma, 8)
    w_l: gl.constexpr = gl.to_linear_layout(a_op, [BLOCK_N, 64])
    x_l: gl.constexpr = gl.to_linear_layout(b_op, [64, BLOCK_M])
    c_l: gl.constexpr = gl.BlockedLayout([2, 1], [8, 4], [WARPS, 1], [1, 0])  # warp w: rows 16w..16w+15, 16 B each

    w_s = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, 64], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    x_s = gl.allocate_shared_memory(V_DTYPE, [X_GROUPS * 128, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [0, 1]))
    tid = _thread_ids(WARPS)
    if PDL:
        _pdl_chain(tid)
    pid_n = gl.program_id(0)
    g0 = gl.program_id(1) * ITERS
    g_end = gl.minimum(g0 + ITERS, NUM_G)
    tab = _table_words(lut_ptr, tid)

    rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, c_l))[:, None]
    chunks = gl.arange(0, 4, layout=gl.SliceLayout(0, c_l))[None, :] * 16
    c_ptrs = w_ptr + rows * stride_wn + chunks
    base = gl.inline_asm_elementwise("mov.u32 $0, global_smem; // $1", "=r,r", [tid], dtype=gl.int32, is_pure=True,
                                     pack=1)
    c_smem = gl.sum(base, axis=0) + W_OFF + (rows - pid_n * BLOCK_N) * 64 + chunks
    if EVEN:  # noqa: SIM108 (a static branch: Gluon's ternary would build both sides)
        c_rows = (rows >= 0) & (chunks >= 0)
    else:
        c_rows = (rows < N) & (chunks >= 0)

    _x_slice(x_s, x_ptr, M, K, g0, g_end, stride_xm, BLOCK_M, EVEN)
    for j in gl.static_range(STAGES - 1):
        _copy_codes(c_smem + j * BLOCK_N * 64, c_ptrs + (g0 + j) * 64, c_rows & (g0 + j < g_end), tid)
    async_copy.wait_group(STAGES - 1)  # x's slice (the oldest commit group) landed ...
    gl.thread_barrier()  # ... for every thread: the kernel's only CTA barrier

    row_l: gl.constexpr = gl.SliceLayout(1, mma)
    srows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=row_l)
    s_ptrs = absmax_ptr + srows * stride_an
    s_mask = srows < N
    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
    scales = _scales(s_ptrs, s_mask, g0, g_end, EVEN)
    acc = zero
    ctx = (w_s, x_s, c_smem, c_ptrs, c_rows, g_end, zero, tab, s_ptrs, s_mask, tid)
    for i in gl.static_range(ITERS):
        acc, scales = _own_step(acc, scales, ctx, i % STAGES, i, g0 + i, w_l, x_l, a_op, b_op, V_DTYPE, STAGES, EVEN)
    _per_thread(_WAIT_ALL, tid)
    _store_tile(acc, srows, s_mask, gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma)), M, N, gl.program_id(1),
                stride_ym, bias_ptr, y_ptr, part_ptr, HAS_BIAS, SPLIT_K)


def ring_offset(cfg: Nf4Config, iters: int) -> tuple[int, int]:
    """(X_GROUPS, W_OFF) for nf4_regs_own_kernel under cfg with `iters` groups a slice: x's buffer rounded up to a
    power of two groups, and the code ring's offset from the shared memory base (after x's buffer where that is the
    larger). Equal sizes are refused: which buffer then comes first is the allocator's choice."""
    x_groups = triton.next_power_of_2(iters)
    x_bytes, w_bytes = x_groups * 128 * cfg.block_m * 2, cfg.stages * cfg.block_n * 64
    if x_bytes == w_bytes:
        raise ValueError(f"own_rows: x's slice and the code ring both take {x_bytes} bytes; change the stages")
    return x_groups, x_bytes if x_bytes > w_bytes else 0


def launch_regs_own(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor,
                    bias: torch.Tensor | None, y: torch.Tensor, cfg: Nf4Config) -> torch.Tensor | None:
    """nf4_regs_own_kernel writing y, or (split K) its fp32 sums [split, M, N] (as _nf4_regs_gluon.launch_regs)."""
    m, k = x.shape
    n, split = codes.shape[0], cfg.split_k
    groups = codes.shape[1] // 64
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    x_groups, w_off = ring_offset(cfg, triton.cdiv(groups, split))
    nf4_regs_own_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, codes, absmax, lut, bias if bias is not None else y, y, part, m, n, k, groups, x.stride(0),
        codes.stride(0), absmax.stride(0), y.stride(0), HAS_BIAS=bias is not None,
        V_DTYPE=gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16, BLOCK_M=cfg.block_m, SPLIT_K=split,
        ITERS=triton.cdiv(groups, split), STAGES=cfg.stages, X_GROUPS=x_groups, W_OFF=w_off,
        EVEN=cfg.even and n % cfg.block_n == 0 and k == groups * 128, num_warps=cfg.warps, **pdl_args(x),
    )
    return part if split > 1 else None
