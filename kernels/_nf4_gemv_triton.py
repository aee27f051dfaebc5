"""The NF4 GEMV kernel: M <= a few rows with no tl.dot (layout and semantics: hotlora.kernels.nf4; its lookup and
the split-K reduce: hotlora.kernels._nf4_triton)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._nf4_triton import _group_values, _prmt_table


@triton.jit
def _gemv_chunk(acc, x_ptr, w_ptr, absmax_ptr, lut_ptr, tab, offs_n, mask_n, g, M, K, NUM_G, stride_xm, stride_wn,
                stride_an, LOOKUP: tl.constexpr, V_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, G: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] += groups g .. g + G - 1 for every row of x; the G groups' bytes are one
    contiguous [BLOCK_N, 64 * G] load (groups sit back to back in a row), so more bytes are in flight."""
    offs_c = tl.arange(0, 64 * G)
    grp = g + offs_c // 64  # group of each byte column
    raw = tl.load(w_ptr + offs_n[:, None] * stride_wn + (g * 64 + offs_c)[None, :],
                  mask=mask_n[:, None] & (grp < NUM_G)[None, :], other=0)
    v_hi, v_lo = _group_values(raw, lut_ptr, tab, LOOKUP, V_DTYPE)
    v_hi = v_hi.to(tl.float32)
    v_lo = v_lo.to(tl.float32)
    offs_g = g + tl.arange(0, G)
    a_ptrs = absmax_ptr + offs_n[:, None] * stride_an + 2 * offs_g[None, :]
    mask_a = mask_n[:, None] & (offs_g < NUM_G)[None, :]
    a_hi = tl.load(a_ptrs, mask=mask_a, other=0.0)  # [BLOCK_N, G]: scales of each group's two halves
    a_lo = tl.load(a_ptrs + 1, mask=mask_a, other=0.0)
    k_hi = grp * 128 + offs_c % 64  # x column of each high nibble; the low nibble's is 64 further
    cols = tl.arange(0, BLOCK_M)
    for r in tl.static_range(BLOCK_M):  # rows >= M read zeros and are never stored
        x_row = x_ptr + r * stride_xm
        x_hi = tl.load(x_row + k_hi, mask=(k_hi < K) & (r < M), other=0.0).to(tl.float32)
        x_lo = tl.load(x_row + k_hi + 64, mask=(k_hi + 64 < K) & (r < M), other=0.0).to(tl.float32)
        s_hi = tl.sum(tl.reshape(v_hi * x_hi[None, :], (BLOCK_N, G, 64)), axis=2)  # [BLOCK_N, G] per 64-block
        s_lo = tl.sum(tl.reshape(v_lo * x_lo[None, :], (BLOCK_N, G, 64)), axis=2)
        p = tl.sum(s_hi * a_hi + s_lo * a_lo, axis=1)
        acc = tl.where(cols[None, :] == r, acc + p[:, None], acc)
    return acc


@triton.jit
def nf4_gemv_kernel(x_ptr, w_ptr, absmax_ptr, lut_ptr, bias_ptr, y_ptr, part_ptr,
                    M, N, K, NUM_G, stride_xm, stride_wn, stride_an, stride_ym,
                    HAS_BIAS: tl.constexpr, LOOKUP: tl.constexpr, V_DTYPE: tl.constexpr, TABLE_REGS: tl.constexpr,
                    BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, G: tl.constexpr, SPLIT_K: tl.constexpr, ITERS: tl.constexpr):
    """y[M, N] = x @ dequant(w).T (+ bias) for M <= BLOCK_M (a small power of two), with no tl.dot.

    Program (pid_n, pid_k) owns BLOCK_N output columns and K-chunks pid_k * ITERS .. + ITERS - 1 of G
    128-column groups each. Per chunk the code values (fp32) are multiplied by each x row's halves, summed
    per 64-block, scaled by absmax (scale-after, as nf4_matmul_kernel's small-M path) and accumulated in
    fp32: the weight bytes are read once for all rows. With SPLIT_K > 1 each program writes its K-slice's
    sum to part[pid_k] and nf4_reduce_kernel finishes; else the bias is added here.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed: rows of x along the second axis
    tab = _prmt_table(lut_ptr, LOOKUP, TABLE_REGS)
    for i in range(ITERS):  # constexpr: the interpreter cannot loop over a run-time scalar argument
        acc = _gemv_chunk(acc, x_ptr, w_ptr, absmax_ptr, lut_ptr, tab, offs_n, mask_n, (pid_k * ITERS + i) * G, M, K,
                          NUM_G, stride_xm, stride_wn, stride_an, LOOKUP, V_DTYPE, BLOCK_M, BLOCK_N, G)
    offs_m = tl.arange(0, BLOCK_M)
    mask = mask_n[:, None] & (offs_m < M)[None, :]
    if SPLIT_K > 1:
        tl.store(part_ptr + (pid_k * M + offs_m[None, :]) * N + offs_n[:, None], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)
