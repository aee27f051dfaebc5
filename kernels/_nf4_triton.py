"""Triton kernels of the fused NF4 dequant-GEMM (layout and semantics: hotlora.kernels.nf4).

A step covers one 128-column group g of the weight: byte j of a row's group holds column 128g + j in its
high nibble and column 128g + 64 + j in its low nibble, so the two nibbles of a byte tile are two dense
[BLOCK_N, 64] halves, each inside one 64-block with one absmax per row: no interleaving shuffles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import pdl_enter
from ._nf4_sums_triton import _epilogue
from .reference import NF4_NIBBLE

# PRMT: the register lookup, table words from lut; PRMT_IMM: the same lookup with the table as immediates (kept
# where the swept configs prefer it); CAST: nibble as value, wrong on purpose (bench only)
LOOKUP_TABLE, LOOKUP_PRMT, LOOKUP_CAST, LOOKUP_PRMT_IMM = 0, 1, 2, 3


def _prmt_asm(dtype: torch.dtype, immediates: bool = False) -> tuple[str, list[int]]:
    """PTX for 4 packed bytes -> the values of their high and low nibbles (2 x 4 16-bit values, `dtype`).

    The 16 values' low bytes and high bytes are tables of four registers each; prmt picks 4 bytes at once from 8 by
    3-bit selectors, so nibbles 0-7 and 8-15 are looked up in separate table halves. Where the table is paired
    (NF4_NIBBLE_ORDER: the values of nibbles j and j + 8 share the top bit of each byte, true for bf16), no mask is
    built: the first half is read with the raw nibbles, the second with bit 3 of every nibble flipped (one xor a
    word), and the two are xor-ed. A selector nibble with bit 3 set makes prmt replicate the picked byte's top bit
    (0x00 or 0xFF), so each half's lookup is its table byte where the nibble is its own and 0x00 / 0xFF where not;
    the second half's table holds its bytes xor-ed with 0xFF where the first half's byte j has its top bit set,
    which the pairing makes consistent: 19 instructions per 8 values. Else (fp16) the halves are merged by lop3
    under a mask of 0x00 / 0xFF bytes made from each nibble's bit 3 in four instructions. Nibbles of byte k: low =
    element k of output 2, high = element k of output 1. The table words are operands $5, $9, ... $37 (the nine
    words returned, each a 32-bit argument filling four operands at pack=4; the paired table's ninth is unused), or
    with `immediates` constants in the text (LOOKUP_PRMT_IMM).
    """
    bits = torch.tensor(NF4_NIBBLE, dtype=torch.float32).to(dtype).view(torch.int16).int() & 0xFFFF
    bits = torch.where(bits == 0, 0x8000, bits)  # zero as -0.0: a negative's top bit, for the pairing
    lo, hi = (bits & 0xFF).tolist(), (bits >> 8).tolist()
    paired = all((t[j] ^ t[j + 8]) & 0x80 == 0 for t in (lo, hi) for j in range(8))

    def words(b: list[int]) -> list[str]:
        return [hex(b[i] | b[i + 1] << 8 | b[i + 2] << 16 | b[i + 3] << 24) for i in range(0, 16, 4)]

    def flipped(t: list[int]) -> list[int]:  # the second half's bytes, as the xor of both halves' lookups wants
        return [*t[:8], *(t[j + 8] ^ (0xFF if t[j] & 0x80 else 0) for j in range(8))]

    if paired:  # with the flipped selectors' register
        table, regs = [*words(flipped(lo)), *words(flipped(hi)), "0x0"], "%f"
    else:  # with the mask's
        table, regs = [*words(lo), *words(hi), "0x8000"], "%i3, %t, %m, %K"
    lines = ["{", f".reg .b32 %s, %a, %b, %lw, %hw, %L<4>, %H<4>, {regs};"]
    operands = table if immediates else [f"${5 + 4 * i}" for i in range(9)]
    lines += [f"mov.b32 %L{i}, {operands[i]};" for i in range(4)]
    lines += [f"mov.b32 %H{i}, {operands[4 + i]};" for i in range(4)]
    if paired:  # the second table half read with bit 3 of every selector flipped (%f); the halves' bytes xor-ed
        lines.append("xor.b32 %f, $4, 0x88888888;")
        first, second, merge = "%s", "%f", "xor.b32 {}, %a, %b;"
    else:  # both halves read with bit 3 cleared (%i3), merged under the mask
        lines.append(f"mov.b32 %K, {operands[8]};")
        first = second = "%i3"
        merge = "lop3.b32 {}, %b, %a, %m, 0xE4;"
    for half, (out_hi, out_lo) in enumerate((("$0", "$2"), ("$1", "$3"))):
        lines.append("mov.b32 %s, $4;" if half == 0 else "shr.b32 %s, $4, 16;")
        if paired:
            if half:
                lines.append("shr.b32 %f, %f, 16;")
        else:
            lines += ["and.b32 %t, %s, 0x8888;", "shr.b32 %m, %t, 3;", "or.b32 %m, %m, %t;",
                      "prmt.b32 %m, %K, %K, %m;", "and.b32 %i3, %s, 0x7777;"]
        for t, out in (("L", "%lw"), ("H", "%hw")):  # the low bytes' table, then the high bytes'
            lines += [f"prmt.b32 %a, %{t}0, %{t}1, {first};", f"prmt.b32 %b, %{t}2, %{t}3, {second};",
                      merge.format(out)]
        lines += [f"prmt.b32 {out_lo}, %lw, %hw, 0x6240;", f"prmt.b32 {out_hi}, %lw, %hw, 0x7351;"]
    return "\n".join([*lines, "}"]), [int(w, 16) for w in table]


_PRMT_BF16 = tl.constexpr(_prmt_asm(torch.bfloat16)[0])
_PRMT_FP16 = tl.constexpr(_prmt_asm(torch.float16)[0])
_PRMT_IMM_BF16 = tl.constexpr(_prmt_asm(torch.bfloat16, immediates=True)[0])
_PRMT_IMM_FP16 = tl.constexpr(_prmt_asm(torch.float16, immediates=True)[0])
_PRMT_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,r" + ",r" * 36)


_TABLE_COPY = tl.constexpr(16)  # words from one copy of the lookup's table to the next in its lut


def prmt_table_words(dtype: torch.dtype) -> list[int]:
    """lut for LOOKUP_PRMT with x in `dtype` (fp16/bf16): the asm's nine table words, twice (_prmt_table)."""
    words = [w - (1 << 32) if w >= 1 << 31 else w for w in _prmt_asm(dtype)[1]]  # as int32
    padded = [*words, *[0] * (_TABLE_COPY - len(words))]
    return [*padded, *padded]


@triton.jit
def _group_bytes(w_ptr, offs_n, rows, valid, g, stride_wn):
    """uint8 [BLOCK_N, 64] bytes of group g. rows: [BLOCK_N] rows to read (False past N or past the last group),
    or None for all of them; nothing is read where `valid` (a scalar) is False."""
    offs_b = g * 64 + tl.arange(0, 64)
    if rows is None:  # noqa: SIM108 (a static branch: Triton's ternary would build both sides)
        mask = valid
    else:
        mask = rows[:, None] & valid
    return tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :], mask=mask, other=0)


@triton.jit
def _prmt_table(lut_ptr, LOOKUP: tl.constexpr, TABLE_REGS: tl.constexpr):
    """The register lookup's nine table words, loaded once per program before the K loop (LOOKUP_PRMT: lut
    is prmt_table_words(), int32, two copies 16 words apart). prmt takes both table operands from ordinary
    registers: as immediates, or as loads ptxas can prove uniform, the words are parked in uniform
    registers and one is copied back before each prmt (~20% of the loop's instructions, sm_90 SASS). With
    TABLE_REGS odd and even threads read different copies, so the loads are not uniform and the words stay
    put, at the cost of nine registers (large tiles may spill: the configs choose)."""
    if LOOKUP == 1:
        base = lut_ptr
        if TABLE_REGS:
            tid = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [tl.zeros((1,), tl.int32)],
                                            dtype=tl.int32, is_pure=True, pack=1)
            base = lut_ptr + (tid & 1) * _TABLE_COPY
        tab = (tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3),
               tl.load(base + 4), tl.load(base + 5), tl.load(base + 6), tl.load(base + 7),
               tl.load(base + 8))
    else:
        tab = (0, 0, 0, 0, 0, 0, 0, 0, 0)
    return tab


@triton.jit
def _group_values(raw, lut_ptr, tab, LOOKUP: tl.constexpr, V_DTYPE: tl.constexpr):
    """Nibble values of a group's bytes (high half, low half): table loads, or (LOOKUP_PRMT / _IMM, 16-bit
    V_DTYPE on NVIDIA) byte permutes against the table held in registers (_prmt_asm; tab: _prmt_table).

    The asm is pure, so Triton's search for the width an MMA operand was loaded with (AccelerateMatmul's
    computeOrigBitWidth) walks through it to the uint8 load and gives both operands kWidth 4. Marked impure
    (is_pure=False: the walk stops, kWidth 2, x through ldmatrix and the values through shared memory) the
    loop has fewer sm_90 instructions (M=32: 599 -> 398) but ran 4-40% slower at every M on the H200, and
    the engine 2-8% slower (BENCHMARKS.md, sixth session)."""
    if LOOKUP == 1:
        args = [raw, tab[0], tab[1], tab[2], tab[3], tab[4], tab[5], tab[6], tab[7], tab[8]]
        if tl.bfloat16 == V_DTYPE:
            v_hi, v_lo = tl.inline_asm_elementwise(_PRMT_BF16, _PRMT_CONSTRAINTS, args,
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            v_hi, v_lo = tl.inline_asm_elementwise(_PRMT_FP16, _PRMT_CONSTRAINTS, args,
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    elif LOOKUP == 3:
        if tl.bfloat16 == V_DTYPE:
            v_hi, v_lo = tl.inline_asm_elementwise(_PRMT_IMM_BF16, "=r,=r,=r,=r,r", [raw],
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            v_hi, v_lo = tl.inline_asm_elementwise(_PRMT_IMM_FP16, "=r,=r,=r,=r,r", [raw],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    elif LOOKUP == 2:
        v_hi, v_lo = (raw >> 4).to(V_DTYPE), (raw & 15).to(V_DTYPE)
    else:
        v_hi = tl.load(lut_ptr + (raw >> 4))
        v_lo = tl.load(lut_ptr + (raw & 15))
    return v_hi, v_lo


@triton.jit
def _group_scales(absmax_ptr, offs_n, rows, valid, g, stride_an):
    """The absmax of group g's two 64-blocks per row; rows and valid as for _group_bytes."""
    if rows is None:  # noqa: SIM108 (a static branch: Triton's ternary would build both sides)
        mask = valid
    else:
        mask = rows & valid
    hi = tl.load(absmax_ptr + offs_n * stride_an + 2 * g, mask=mask, other=0.0)
    lo = tl.load(absmax_ptr + offs_n * stride_an + 2 * g + 1, mask=mask, other=0.0)
    return hi, lo


@triton.jit
def nf4_dequant_kernel(w_ptr, absmax_ptr, lut_ptr, out_ptr, N, K, stride_wn, stride_an, stride_on,
                       BLOCK_N: tl.constexpr):
    """out[N, K] = dequant(w) rounded to out's dtype, one 128-column group per program column."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    mask_n = offs_n < N
    v_hi, v_lo = _group_values(_group_bytes(w_ptr, offs_n, mask_n, True, g, stride_wn), lut_ptr, (0,), 0,
                               tl.float32)
    a_hi, a_lo = _group_scales(absmax_ptr, offs_n, mask_n, True, g, stride_an)
    w_hi = v_hi * a_hi[:, None]  # fp32 product, as bitsandbytes computes it
    w_lo = v_lo * a_lo[:, None]
    offs_k = g * 128 + tl.arange(0, 64)
    ptrs = out_ptr + offs_n[:, None] * stride_on + offs_k[None, :]
    tl.store(ptrs, w_hi.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & (offs_k[None, :] < K))
    tl.store(ptrs + 64, w_lo.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & (offs_k[None, :] + 64 < K))


@triton.jit
def _load_x(x_ptr, offs_m, mask_m, g, valid, K, stride_xm, EVEN: tl.constexpr, X_TMA: tl.constexpr = False, m0=0):
    """x's two [rows, 64] halves of 128-column group g (zeros past M, past K, or where `valid` is False). X_TMA:
    x_ptr is a tensor descriptor of x ([rows, 64] blocks, rows from m0; rows past M and columns past K read as
    zeros), read by the copy engine straight into shared memory (`valid` must be True: no prefetch)."""
    if X_TMA:
        x_hi = x_ptr.load([m0, g * 128])
        x_lo = x_ptr.load([m0, g * 128 + 64])
    else:
        offs_k = g * 128 + tl.arange(0, 64)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        mask_x = mask_m[:, None] & valid
        if EVEN:
            x_hi = tl.load(x_ptrs, mask=mask_x, other=0.0)
            x_lo = tl.load(x_ptrs + 64, mask=mask_x, other=0.0)
        else:
            x_hi = tl.load(x_ptrs, mask=mask_x & (offs_k[None, :] < K), other=0.0)
            x_lo = tl.load(x_ptrs + 64, mask=mask_x & (offs_k[None, :] + 64 < K), other=0.0)
    return x_hi, x_lo


@triton.jit
def _load_group(x_ptr, w_ptr, absmax_ptr, offs_m, mask_m, offs_n, mask_n, g, valid, K, NUM_G,
                stride_xm, stride_wn, stride_an, EVEN: tl.constexpr, TMA: tl.constexpr = False, n0=0,
                X_TMA: tl.constexpr = False, m0=0):
    """Everything one 128-column group g needs: x's two [BLOCK_M, 64] halves, the weight bytes, the scales.
    Nothing is read where `valid` is False or g is past the last group (split-K slices may run past it).
    EVEN: N is a multiple of BLOCK_N, K of 128 and the groups of SPLIT_K, so only x's rows and `valid`
    need masks (~10% of the loop's instructions at M=16). TMA: w_ptr is a tensor descriptor of the codes
    ([BLOCK_N, 64] blocks, rows from n0), read by the copy engine into shared memory; Triton's pipeliner keeps
    `num_stages` groups in flight with no registers held (rows and groups past the end read as zeros). X_TMA: x
    by TMA too (_load_x)."""
    x_hi, x_lo = _load_x(x_ptr, offs_m, mask_m, g, valid, K, stride_xm, EVEN, X_TMA, m0)
    rows = None if EVEN else mask_n & (g < NUM_G)
    if TMA:  # noqa: SIM108 (a static branch: Triton's ternary would build both sides)
        raw = w_ptr.load([n0, g * 64])
    else:
        raw = _group_bytes(w_ptr, offs_n, rows, valid, g, stride_wn)
    a_hi, a_lo = _group_scales(absmax_ptr, offs_n, rows, valid, g, stride_an)
    return x_hi, x_lo, raw, a_hi, a_lo


@triton.jit
def _dot(w, x, acc, SWAP_AB: tl.constexpr, PRECISION: tl.constexpr):
    """w [BLOCK_N, 64] against x [BLOCK_M, 64]: acc (+)= w @ x.T with SWAP_AB (weights first), else x @ w.T."""
    if SWAP_AB:
        return tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
    else:
        return tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)


@triton.jit
def _scaled(v_hi, v_lo, a_hi, a_lo, X_DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, SCALE: tl.constexpr,
            V_DTYPE: tl.constexpr):
    """A group's weights for the dot: the code values scaled by their rows' absmax in x's dtype (SCALE 1), or
    in fp32 and rounded to W_DTYPE as dequantize_4bit does, then to x's dtype (SCALE 2)."""
    if SCALE == 1:
        w_hi = v_hi * a_hi.to(V_DTYPE)[:, None]
        w_lo = v_lo * a_lo.to(V_DTYPE)[:, None]
    else:
        w_hi = (v_hi * a_hi[:, None]).to(W_DTYPE).to(X_DTYPE)
        w_lo = (v_lo * a_lo[:, None]).to(W_DTYPE).to(X_DTYPE)
    return w_hi, w_lo


@triton.jit
def _accumulate(acc, x_hi, x_lo, raw, a_hi, a_lo, lut_ptr, tab, W_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                SCALE: tl.constexpr, SWAP_AB: tl.constexpr, LOOKUP: tl.constexpr, V_DTYPE: tl.constexpr):
    """acc (+)= one group's contribution (acc is [BLOCK_N, BLOCK_M] with SWAP_AB, else [BLOCK_M, BLOCK_N]).
    SCALE (hotlora.kernels.nf4.SCALE_*): 0 scales each 64-block's partial sums, 1 the code values in x's dtype
    before the dot (which then accumulates in place), 2 the fp32 code values, rounded as dequantize_4bit does."""
    v_hi, v_lo = _group_values(raw, lut_ptr, tab, LOOKUP, V_DTYPE)
    if SCALE == 0:
        p_hi = _dot(v_hi, x_hi, None, SWAP_AB, PRECISION)
        p_lo = _dot(v_lo, x_lo, None, SWAP_AB, PRECISION)
        if SWAP_AB:
            acc += p_hi * a_hi[:, None] + p_lo * a_lo[:, None]
        else:
            acc += p_hi * a_hi[None, :] + p_lo * a_lo[None, :]
    else:
        w_hi, w_lo = _scaled(v_hi, v_lo, a_hi, a_lo, x_hi.dtype, W_DTYPE, SCALE, V_DTYPE)
        acc = _dot(w_hi, x_hi, acc, SWAP_AB, PRECISION)
        acc = _dot(w_lo, x_lo, acc, SWAP_AB, PRECISION)
    return acc


@triton.jit
def _accumulate_tail(acc, acc_t, x_hi, x_lo, t_hi, t_lo, raw, a_hi, a_lo, lut_ptr, tab, W_DTYPE: tl.constexpr,
                     PRECISION: tl.constexpr, SCALE: tl.constexpr, SWAP_AB: tl.constexpr, LOOKUP: tl.constexpr,
                     V_DTYPE: tl.constexpr):
    """_accumulate for two row tiles of x (x_*: BLOCK_M rows into acc, t_*: TAIL_M rows into acc_t) against one
    dequantized weight tile (SCALE 1 or 2), so a program covers BLOCK_M + TAIL_M rows with one lookup."""
    v_hi, v_lo = _group_values(raw, lut_ptr, tab, LOOKUP, V_DTYPE)
    w_hi, w_lo = _scaled(v_hi, v_lo, a_hi, a_lo, x_hi.dtype, W_DTYPE, SCALE, V_DTYPE)
    acc = _dot(w_hi, x_hi, acc, SWAP_AB, PRECISION)
    acc = _dot(w_lo, x_lo, acc, SWAP_AB, PRECISION)
    acc_t = _dot(w_hi, t_hi, acc_t, SWAP_AB, PRECISION)
    acc_t = _dot(w_lo, t_lo, acc_t, SWAP_AB, PRECISION)
    return acc, acc_t


@triton.jit
def nf4_matmul_kernel(x_ptr, xt_ptr, w_ptr, absmax_ptr, lut_ptr, bias_ptr, y_ptr, part_ptr, count_ptr,
                      M, N, K, NUM_G, stride_xm, stride_wn, stride_an, stride_ym,
                      HAS_BIAS: tl.constexpr, W_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                      SCALE: tl.constexpr, SWAP_AB: tl.constexpr, LOOKUP: tl.constexpr,
                      V_DTYPE: tl.constexpr, TABLE_REGS: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, ITERS: tl.constexpr, GROUP_M: tl.constexpr,
                      EVEN: tl.constexpr, PDL: tl.constexpr, TMA: tl.constexpr = False, TAIL_M: tl.constexpr = 0,
                      X_TMA: tl.constexpr = False, FIXUP: tl.constexpr = 0):
    """y[M, N] = x @ dequant(w).T (+ bias), fp32 accumulation, ITERS 128-column groups per program.

    SCALE 0 (small M): dot the code values (lut, already in x's dtype) and scale each 64-block's
    [BLOCK_M, BLOCK_N] partial by its absmax; 1: scale the code values in x's dtype, then dot; 2: scale the
    weights first, as dequantize_4bit does (lut in fp32, product rounded to W_DTYPE). PREFETCH issues group
    i+1's loads before group i's math (register double-buffering). With SPLIT_K > 1 each program writes its
    K-slice's fp32 sum to part[pid_k], and nf4_reduce_kernel finishes. EVEN: no masks on the weight and K
    (_load_group). PDL: launched with kernels._launch.pdl_args. TMA: w_ptr is the codes' descriptor (_load_group).
    TAIL_M (a power of two, SCALE 1 or 2, not PREFETCH): a program covers BLOCK_M + TAIL_M rows of x, the last
    TAIL_M in a second accumulator fed by the same dequantized weights (_accumulate_tail): 192 rows as 128 + 64
    instead of a 256-row tile, whose MMA work past M is wasted. X_TMA (with TMA): x_ptr and xt_ptr are tensor
    descriptors of x with [BLOCK_M, 64] and [TAIL_M, 64] blocks (xt_ptr: the tail's; unused without a tail), and
    x's tiles come by TMA as the weight bytes do; otherwise xt_ptr is unused. FIXUP (SPLIT_K > 1; count_ptr: int32
    zeros, one per program along axis 0, left zero): the tile's K slices end in y here, so no nf4_reduce_kernel launch
    follows; the sum is the reduce's, in the same order. Every program stores its sums; those of slices 0 ..
    SPLIT_K - 2 count in without waiting (_count_in), and the program of the last slice waits for them
    (_await_slices) and sums the tile.
    """
    pdl_enter(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M + TAIL_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n  # GROUP_M row tiles walk the same weight columns while they sit in L2
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    m0 = pid_m * (BLOCK_M + TAIL_M)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if SWAP_AB:  # noqa: SIM108 (static branches keep each compiled variant's accumulator shape plain)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g0 = pid_k * ITERS
    tab = _prmt_table(lut_ptr, LOOKUP, TABLE_REGS)
    if TAIL_M > 0:
        offs_t = m0 + BLOCK_M + tl.arange(0, TAIL_M)
        mask_t = offs_t < M
        if SWAP_AB:
            acc_t = tl.zeros((BLOCK_N, TAIL_M), dtype=tl.float32)
        else:
            acc_t = tl.zeros((TAIL_M, BLOCK_N), dtype=tl.float32)
    if PREFETCH:
        xh, xl, raw, ah, al = _load_group(x_ptr, w_ptr, absmax_ptr, offs_m, mask_m, offs_n, mask_n, g0, True,
                                          K, NUM_G, stride_xm, stride_wn, stride_an, EVEN)
        for i in range(ITERS):  # constexpr: the interpreter cannot loop over a run-time scalar argument
            nxh, nxl, nraw, nah, nal = _load_group(x_ptr, w_ptr, absmax_ptr, offs_m, mask_m, offs_n, mask_n,
                                                   g0 + i + 1, i + 1 < ITERS, K, NUM_G, stride_xm, stride_wn,
                                                   stride_an, EVEN)
            acc = _accumulate(acc, xh, xl, raw, ah, al, lut_ptr, tab, W_DTYPE, PRECISION, SCALE, SWAP_AB,
                              LOOKUP, V_DTYPE)
            xh, xl, raw, ah, al = nxh, nxl, nraw, nah, nal
    else:
        for i in range(ITERS):
            xh, xl, raw, ah, al = _load_group(x_ptr, w_ptr, absmax_ptr, offs_m, mask_m, offs_n, mask_n, g0 + i, True,
                                              K, NUM_G, stride_xm, stride_wn, stride_an, EVEN, TMA, pid_n * BLOCK_N,
                                              X_TMA, m0)
            if TAIL_M > 0:  # the tail's rows of x against the same dequantized weights
                th, tlo = _load_x(xt_ptr, offs_t, mask_t, g0 + i, True, K, stride_xm, EVEN, X_TMA, m0 + BLOCK_M)
                acc, acc_t = _accumulate_tail(acc, acc_t, xh, xl, th, tlo, raw, ah, al, lut_ptr, tab, W_DTYPE,
                                              PRECISION, SCALE, SWAP_AB, LOOKUP, V_DTYPE)
            else:
                acc = _accumulate(acc, xh, xl, raw, ah, al, lut_ptr, tab, W_DTYPE, PRECISION, SCALE, SWAP_AB,
                                  LOOKUP, V_DTYPE)
    if TAIL_M == 0:  # one epilogue for both: the tail's arguments stand in, unused
        acc_t, offs_t, mask_t = acc, offs_m, mask_m
    _epilogue(acc, acc_t, offs_m, mask_m, offs_t, mask_t, offs_n, mask_n, bias_ptr, y_ptr, part_ptr, count_ptr,
              pid_k, M, N, stride_ym, HAS_BIAS, SWAP_AB, SPLIT_K, TAIL_M, FIXUP)
