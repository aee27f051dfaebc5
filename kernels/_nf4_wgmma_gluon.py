"""The NF4 matmul at prefill sizes with the looked-up weights as wgmma's register operand (Gluon; Hopper only).

At M >= 65 nf4_matmul_kernel (Triton) dequantizes each weight tile, stores it to shared memory and runs wgmma
from there, or (M > 384 for small weights) the weight is dequantized whole and cuBLAS runs: both leave the
matmul ~1.5x cuBLAS's time at M = 512. Here the weights are the warpgroup MMA's A operand straight from
registers: y^T = W @ x^T, 64 weight rows per warpgroup (BLOCK_N = 16 * num_warps), x's rows the MMA's N
(BLOCK_M, 64-256). Code bytes ([BLOCK_N, 64] a 128-column group) and x ([BLOCK_M, 64] twice a group) come by
TMA into STAGES-deep shared-memory rings; each thread reads the bytes of its A fragment (k_width 2: two pairs
of consecutive columns per 16), the prmt lookup (_nf4_triton._prmt_asm) turns them into bf16/fp16 values,
which are scaled by their rows' absmax in x's dtype (SCALE_VALUES, nf4_matmul_kernel's rounding at these
sizes) and fed to two async wgmmas (the group's high- and low-nibble 64-blocks). The next group is looked up
while they run. K splits into SPLIT_K slices of ITERS groups; with more than one, each program stores its fp32
sums into part [SPLIT_K, M, N] for the reduce (or a LoRA finish hook).
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
from ._nf4_configs import Nf4Config
from ._nf4_regs_gluon import _lookup, _table_words


@gluon.jit
def _issue(x_desc, w_desc, x_s, w_s, bars, st, g, m0, n0, ok):
    """TMA of group g's code bytes and x's two [BLOCK_M, 64] halves into stage st (nothing where not ok)."""
    bar = bars.index(st)
    mbarrier.expect(bar, w_desc.block_type.nbytes + 2 * x_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(w_desc, [n0, g * 64], bar, w_s.index(st), pred=ok)
    tma.async_copy_global_to_shared(x_desc, [m0, g * 128], bar, x_s.index(2 * st), pred=ok)
    tma.async_copy_global_to_shared(x_desc, [m0, g * 128 + 64], bar, x_s.index(2 * st + 1), pred=ok)


@gluon.jit
def _weights(w_s, bars, i, ok, s_ptrs, s_mask, g, tab, w_l: gl.constexpr, a_op: gl.constexpr,
             V_DTYPE: gl.constexpr, STAGES: gl.constexpr):
    """Group g's (the slice's i-th) two [BLOCK_N, 64] weight halves in the A operand's layout, scaled by their
    absmax (in x's dtype; zero where not s_mask), once its stage's bytes have landed (no wait where not ok: past
    the last pair, unused values)."""
    s_hi = gl.load(s_ptrs + 2 * g, mask=s_mask, other=0.0).to(V_DTYPE)
    s_lo = gl.load(s_ptrs + (2 * g + 1), mask=s_mask, other=0.0).to(V_DTYPE)
    st = i % STAGES
    mbarrier.wait(bars.index(st), (i // STAGES) & 1, pred=ok)
    raw = w_s.index(st).load(w_l)
    v_hi, v_lo = _lookup(raw, tab, V_DTYPE)
    return (gl.convert_layout(v_hi * s_hi[:, None], a_op), gl.convert_layout(v_lo * s_lo[:, None], a_op))


@gluon.jit
def _mma(acc, w_hi, w_lo, x_s, st):
    """acc + a group's two 64-column halves (weights from registers, x's halves from stage st), issued async."""
    acc = warpgroup_mma(w_hi, x_s.index(2 * st).permute((1, 0)), acc, is_async=True)
    return warpgroup_mma(w_lo, x_s.index(2 * st + 1).permute((1, 0)), acc, is_async=True)


@gluon.jit
def _store(acc, bias_ptr, y_ptr, part_ptr, M, N, m0, n0, pid_k, stride_ym, HAS_BIAS: gl.constexpr,
           SPLIT_K: gl.constexpr):
    """y [m0:, n0:] = acc^T (+ bias), or acc^T into K slice pid_k of part."""
    BLOCK_N: gl.constexpr = acc.shape[0]
    BLOCK_M: gl.constexpr = acc.shape[1]
    out_l: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [1, gl.num_warps()], [0, 1])
    out = gl.convert_layout(acc, out_l)
    rn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_l))
    om = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out_l))
    mask = (rn[:, None] < N) & (om[None, :] < M)
    if SPLIT_K > 1:
        gl.store(part_ptr + (pid_k * M + om[None, :]) * N + rn[:, None], out, mask=mask)
    else:
        if HAS_BIAS:
            out = out + gl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)[:, None]
        gl.store(y_ptr + om[None, :] * stride_ym + rn[:, None], out.to(y_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def nf4_wgmma_kernel(x_desc, w_desc, absmax_ptr, lut_ptr, bias_ptr, y_ptr, part_ptr, M, N, NUM_G, stride_an,
                     stride_ym, HAS_BIAS: gl.constexpr, V_DTYPE: gl.constexpr, SPLIT_K: gl.constexpr,
                     ITERS: gl.constexpr, PDL: gl.constexpr, STAGES: gl.constexpr):
    """y [M, N] (or its K slices' fp32 sums in part) = x [M, K] @ dequant(W).T (module docstring). A program
    covers BLOCK_N = 16 * num_warps weight rows, BLOCK_M rows of x (x_desc's block) and one K slice."""
    WARPS: gl.constexpr = gl.num_warps()
    BLOCK_N: gl.constexpr = 16 * WARPS
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_op: gl.constexpr = gl.DotOperandLayout(0, mma, 2)
    w_l: gl.constexpr = gl.to_linear_layout(a_op, [BLOCK_N, 64])
    row_l: gl.constexpr = gl.SliceLayout(1, w_l)

    tid = gl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [gl.zeros([1], gl.int32, gl.BlockedLayout(
        [1], [32], [WARPS], [0]))], dtype=gl.int32, is_pure=True, pack=1)
    if PDL:  # wait for the kernel before this one (hotlora.kernels._launch), then let the next be scheduled
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0 $1", "=r,r", [tid], dtype=gl.int32, is_pure=False,
                                  pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0 $1", "=r,r", [tid], dtype=gl.int32,
                                  is_pure=False, pack=1)
    pid_m = gl.program_id(0)  # x's row tiles vary fastest: programs on the same weight rows run together (L2)
    pid_n = gl.program_id(1)
    pid_k = gl.program_id(2)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    tab = _table_words(lut_ptr, tid)

    w_s = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, 64], w_desc.layout)
    x_s = gl.allocate_shared_memory(V_DTYPE, [2 * STAGES, BLOCK_M, 64], x_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(STAGES):
        mbarrier.init(bars.index(j), count=1)
    fence_async_shared()

    srows = n0 + gl.arange(0, BLOCK_N, layout=row_l)
    s_ptrs = absmax_ptr + srows * stride_an
    s_mask = srows < N
    g0 = pid_k * ITERS
    iters = gl.minimum(g0 + ITERS, NUM_G) - g0
    # the loop runs groups in pairs (two register sets for the weights, so one pair's lookup is free to run while
    # the other's MMAs do); an odd slice's last pair ends on a group whose weights are zero: past NUM_G its bytes
    # arrive as TMA's zeros, and inside it (the next slice's) its absmax is masked to zero.
    pairs = (iters + 1) // 2 * 2
    for j in gl.static_range(STAGES):
        _issue(x_desc, w_desc, x_s, w_s, bars, j, g0 + j, m0, n0, j < pairs)

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
    wb_hi = gl.zeros([BLOCK_N, 64], V_DTYPE, a_op)
    wb_lo = wb_hi
    wa_hi, wa_lo = _weights(w_s, bars, 0, pairs > 0, s_ptrs, s_mask & (iters > 0), g0, tab, w_l, a_op, V_DTYPE,
                            STAGES)
    for i in range(0, pairs, 2):
        # in flight: group i - 1's MMAs (register set b), now group i's (set a)
        acc = _mma(acc, wa_hi, wa_lo, x_s, i % STAGES)
        acc = warpgroup_mma_wait(2, deps=[acc])  # group i - 1 done: set b and its stage free
        gl.thread_barrier()
        _issue(x_desc, w_desc, x_s, w_s, bars, (i + STAGES - 1) % STAGES, g0 + i - 1 + STAGES, m0, n0,
               (i > 0) & (i - 1 + STAGES < pairs))
        wb_hi, wb_lo = _weights(w_s, bars, i + 1, True, s_ptrs, s_mask & (i + 1 < iters), g0 + i + 1, tab, w_l,
                                a_op, V_DTYPE, STAGES)
        acc = _mma(acc, wb_hi, wb_lo, x_s, (i + 1) % STAGES)
        acc = warpgroup_mma_wait(2, deps=[acc])  # group i done: set a and its stage free
        gl.thread_barrier()
        _issue(x_desc, w_desc, x_s, w_s, bars, i % STAGES, g0 + i + STAGES, m0, n0, i + STAGES < pairs)
        wa_hi, wa_lo = _weights(w_s, bars, i + 2, i + 2 < pairs, s_ptrs, s_mask & (i + 2 < iters), g0 + i + 2, tab,
                                w_l, a_op, V_DTYPE, STAGES)  # unused past the last pair
    acc = warpgroup_mma_wait(0, deps=[acc])
    for j in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(j))

    _store(acc, bias_ptr, y_ptr, part_ptr, M, N, m0, n0, pid_k, stride_ym, HAS_BIAS, SPLIT_K)

@gluon.jit
def _load_codes(w_desc, w_s, ready, empty, n0, g0, pairs, WS: gl.constexpr):
    """Producer warp: the slice's code bytes by TMA, into each stage of the WS-deep ring once it is released."""
    for i in range(pairs):
        st = i % WS
        mbarrier.wait(empty.index(st), ((i // WS) & 1) ^ 1)  # a fresh barrier passes the first round
        mbarrier.expect(ready.index(st), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [n0, (g0 + i) * 64], ready.index(st), w_s.index(st))


@gluon.jit
def _load_x(x_desc, x_s, ready, empty, m0, g0, pairs, XS: gl.constexpr):
    """Producer warp: x's two [BLOCK_M, 64] halves of each group by TMA into the XS-deep ring."""
    for i in range(pairs):
        st = i % XS
        mbarrier.wait(empty.index(st), ((i // XS) & 1) ^ 1)
        mbarrier.expect(ready.index(st), 2 * x_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [m0, (g0 + i) * 128], ready.index(st), x_s.index(2 * st))
        tma.async_copy_global_to_shared(x_desc, [m0, (g0 + i) * 128 + 64], ready.index(st), x_s.index(2 * st + 1))


@gluon.jit
def _scales(s_ptrs, s_mask, g):
    """Group g's two 64-blocks' absmax per weight row (zero where not s_mask)."""
    return gl.load(s_ptrs + 2 * g, mask=s_mask, other=0.0), gl.load(s_ptrs + (2 * g + 1), mask=s_mask, other=0.0)


@gluon.jit
def _looked_up(w_s, ready, i, ok, s_hi, s_lo, tab, w_l: gl.constexpr, a_op: gl.constexpr, V_DTYPE: gl.constexpr,
               WS: gl.constexpr, CAST: gl.constexpr = False):
    """The slice's i-th group's weight halves scaled by s_hi / s_lo in the A operand's layout, read from its ring
    stage once landed (no wait where not ok); the caller releases the stage."""
    s_hi = s_hi.to(V_DTYPE)
    s_lo = s_lo.to(V_DTYPE)
    mbarrier.wait(ready.index(i % WS), (i // WS) & 1, pred=ok)
    if CAST:  # bench only: the bytes as values (wrong on purpose), what everything but the lookup costs
        v_hi = w_s.index(i % WS).load(w_l).to(V_DTYPE)
        v_lo = v_hi
    else:
        v_hi, v_lo = _lookup(w_s.index(i % WS).load(w_l), tab, V_DTYPE)
    return (gl.convert_layout(v_hi * s_hi[:, None], a_op), gl.convert_layout(v_lo * s_lo[:, None], a_op))


@gluon.jit
def _step(acc, w_hi, w_lo, sc, w_s, x_s, w_ready, w_empty, x_ready, x_empty, i, iters, pairs, s_ptrs, s_mask, g0,
          tab, w_l: gl.constexpr, a_op: gl.constexpr, V_DTYPE: gl.constexpr, WS: gl.constexpr, XS: gl.constexpr,
          CAST: gl.constexpr):
    """Group i's MMAs (weights w_hi/w_lo) issued; once group i - 1's have retired, group i + 1's weights looked up
    (scales sc, loaded a step earlier) while these run; then group i - 1's x stage and group i + 1's code stage go
    back to the producers. Returns group i + 2's scales too."""
    sc_next = _scales(s_ptrs, s_mask & (i + 2 < iters), g0 + i + 2)
    mbarrier.wait(x_ready.index(i % XS), (i // XS) & 1)
    acc = _mma(acc, w_hi, w_lo, x_s, i % XS)
    acc = warpgroup_mma_wait(2, deps=[acc])
    nxt = i + 1 < pairs
    n_hi, n_lo = _looked_up(w_s, w_ready, i + 1, nxt, sc[0], sc[1], tab, w_l, a_op, V_DTYPE, WS, CAST)
    gl.thread_barrier()  # every warp is past group i - 1's MMAs and group i + 1's bytes
    mbarrier.arrive(x_empty.index((i + XS - 1) % XS), count=1, pred=i > 0)
    mbarrier.arrive(w_empty.index((i + 1) % WS), count=1, pred=nxt)
    return acc, n_hi, n_lo, sc_next


@gluon.jit
def _consume(w_s, x_s, w_ready, w_empty, x_ready, x_empty, absmax_ptr, lut_ptr, N, n0, g0, iters, pairs, stride_an,
             BLOCK_M: gl.constexpr, V_DTYPE: gl.constexpr, WS: gl.constexpr, XS: gl.constexpr, CAST: gl.constexpr):
    """The default partition: the slice's fp32 sums [BLOCK_N, BLOCK_M] (groups in pairs, as nf4_wgmma_kernel)."""
    WARPS: gl.constexpr = gl.num_warps()
    BLOCK_N: gl.constexpr = 16 * WARPS
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_op: gl.constexpr = gl.DotOperandLayout(0, mma, 2)
    w_l: gl.constexpr = gl.to_linear_layout(a_op, [BLOCK_N, 64])
    tid = gl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [gl.zeros([1], gl.int32, gl.BlockedLayout(
        [1], [32], [WARPS], [0]))], dtype=gl.int32, is_pure=True, pack=1)
    tab = _table_words(lut_ptr, tid)
    srows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_l))
    s_ptrs = absmax_ptr + srows * stride_an
    s_mask = srows < N

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
    s_hi, s_lo = _scales(s_ptrs, s_mask & (iters > 0), g0)
    sc = _scales(s_ptrs, s_mask & (iters > 1), g0 + 1)
    wa_hi, wa_lo = _looked_up(w_s, w_ready, 0, pairs > 0, s_hi, s_lo, tab, w_l, a_op, V_DTYPE, WS)
    gl.thread_barrier()
    mbarrier.arrive(w_empty.index(0), count=1, pred=pairs > 0)
    for i in range(0, pairs, 2):
        acc, wb_hi, wb_lo, sc = _step(acc, wa_hi, wa_lo, sc, w_s, x_s, w_ready, w_empty, x_ready, x_empty, i, iters,
                                      pairs, s_ptrs, s_mask, g0, tab, w_l, a_op, V_DTYPE, WS, XS, CAST)
        acc, wa_hi, wa_lo, sc = _step(acc, wb_hi, wb_lo, sc, w_s, x_s, w_ready, w_empty, x_ready, x_empty, i + 1,
                                      iters, pairs, s_ptrs, s_mask, g0, tab, w_l, a_op, V_DTYPE, WS, XS, CAST)
    return (warpgroup_mma_wait(0, deps=[acc]),)  # warp_specialize's default partition returns a tuple


@gluon.jit
def nf4_wgmma_ws_kernel(x_desc, w_desc, absmax_ptr, lut_ptr, bias_ptr, y_ptr, part_ptr, M, N, NUM_G, stride_an,
                        stride_ym, HAS_BIAS: gl.constexpr, V_DTYPE: gl.constexpr, SPLIT_K: gl.constexpr,
                        ITERS: gl.constexpr, PDL: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr,
                        CAST: gl.constexpr):
    """nf4_wgmma_kernel with its copies in producer warps (warp specialization): one warp keeps a WS-deep ring of
    code bytes filled, another a STAGES-deep ring of x; the kernel's own warps look up and multiply, releasing the
    code stage of a group once looked up and its x stage once its MMAs retired."""
    WARPS: gl.constexpr = gl.num_warps()
    BLOCK_N: gl.constexpr = 16 * WARPS
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    if PDL:  # wait for the kernel before this one (hotlora.kernels._launch), then let the next be scheduled
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0 $1", "=r,r", [gl.zeros([1], gl.int32, gl.BlockedLayout(
            [1], [32], [WARPS], [0]))], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0 $1", "=r,r", [gl.zeros(
            [1], gl.int32, gl.BlockedLayout([1], [32], [WARPS], [0]))], dtype=gl.int32, is_pure=False, pack=1)
    m0 = gl.program_id(0) * BLOCK_M  # x's row tiles vary fastest: programs on the same weight rows run together
    n0 = gl.program_id(1) * BLOCK_N
    pid_k = gl.program_id(2)
    w_s = gl.allocate_shared_memory(gl.uint8, [WS, BLOCK_N, 64], w_desc.layout)
    x_s = gl.allocate_shared_memory(V_DTYPE, [2 * STAGES, BLOCK_M, 64], x_desc.layout)
    w_ready = gl.allocate_shared_memory(gl.int64, [WS, 1], mbarrier.MBarrierLayout())
    w_empty = gl.allocate_shared_memory(gl.int64, [WS, 1], mbarrier.MBarrierLayout())
    x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    x_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(WS):
        mbarrier.init(w_ready.index(j), count=1)
        mbarrier.init(w_empty.index(j), count=1)
    for j in gl.static_range(STAGES):
        mbarrier.init(x_ready.index(j), count=1)
        mbarrier.init(x_empty.index(j), count=1)
    fence_async_shared()
    g0 = pid_k * ITERS
    iters = gl.minimum(g0 + ITERS, NUM_G) - g0
    pairs = (iters + 1) // 2 * 2
    (acc,) = gl.warp_specialize([
        (_consume, (w_s, x_s, w_ready, w_empty, x_ready, x_empty, absmax_ptr, lut_ptr, N, n0, g0, iters, pairs,
                    stride_an, BLOCK_M, V_DTYPE, WS, STAGES, CAST)),
        (_load_codes, (w_desc, w_s, w_ready, w_empty, n0, g0, pairs, WS)),
        (_load_x, (x_desc, x_s, x_ready, x_empty, m0, g0, pairs, STAGES)),
    ], [1, 1], [24, 24])
    _store(acc, bias_ptr, y_ptr, part_ptr, M, N, m0, n0, pid_k, stride_ym, HAS_BIAS, SPLIT_K)


def wgmma_fit(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether nf4_wgmma_kernel takes x @ the weight of `codes`: Hopper (sm_90), 16-bit x, and 16-byte aligned
    rows of x and of the codes (TMA descriptors)."""
    return (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9 and x.dtype != torch.float32
            and x.data_ptr() % 16 == 0 and x.stride(0) * 2 % 16 == 0 and codes.data_ptr() % 16 == 0
            and codes.stride(0) % 16 == 0)


def launch_wgmma(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor,
                 bias: torch.Tensor | None, y: torch.Tensor, cfg: Nf4Config) -> torch.Tensor | None:
    """nf4_wgmma_kernel writing y, or (split K) its fp32 sums [split, M, N], returned for the reduce or a finish
    hook (hotlora.kernels.nf4: the layout of codes and absmax; lut: prmt_table_words of x's dtype)."""
    m, _ = x.shape
    n, split = codes.shape[0], cfg.split_k
    groups = codes.shape[1] // 64
    block_n = 16 * cfg.warps
    el = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    x_desc = TensorDescriptor.from_tensor(x, [cfg.block_m, 64], gl.NVMMASharedLayout.get_default_for(
        [cfg.block_m, 64], el))
    w_desc = TensorDescriptor.from_tensor(codes, [block_n, 64], gl.NVMMASharedLayout.get_default_for(
        [block_n, 64], gl.uint8))
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    ws = int(os.environ.get("HOTLORA_NF4_WGMMA_WS", "0"))
    cast = os.environ.get("HOTLORA_NF4_WGMMA_CAST") == "1"
    kernel, extra = (nf4_wgmma_ws_kernel, {"WS": ws, "CAST": cast}) if ws else (nf4_wgmma_kernel, {})
    kernel[(triton.cdiv(m, cfg.block_m), triton.cdiv(n, block_n), split)](
        x_desc, w_desc, absmax, lut, bias if bias is not None else y, y, part, m, n, groups, absmax.stride(0),
        y.stride(0), HAS_BIAS=bias is not None, V_DTYPE=el, SPLIT_K=split, ITERS=triton.cdiv(groups, split),
        STAGES=cfg.stages, num_warps=cfg.warps, **extra, **pdl_args(x),
    )
    return part if split > 1 else None
