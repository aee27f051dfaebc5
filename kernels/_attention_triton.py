"""Triton bodies of the paged varlen attention (see hotlora.kernels.attention for semantics and layout).

Program (q_block, kv_head, split) of ``paged_attention_kernel``:
- finds its sequence by binary search over the q-block starts ``cu_seqlens_q[s] // BLOCK_Q + s`` (monotone in s,
  and far enough apart to hold every sequence's ceil(q_len / BLOCK_Q) blocks, so a grid of
  ``T // BLOCK_Q + num_seqs`` programs covers any batch of T tokens; spare programs exit at once);
- holds BLOCK_Q query tokens x G_PAD query heads of one KV head as the first BLOCK_Q * G_PAD of the BLOCK_M
  rows of its tile (row r: token r // G_PAD, head kv_head * G + r % G_PAD), so one K/V tile load serves the
  whole group;
- walks its share of the key tiles that the block's queries can see (causal and sliding window), reading each
  key's page from the block table, with an online softmax in fp32 (exp2, log2(e) folded into the scale).
With SPLIT, every program writes its normalized partial output and log2-sum-exp into the workspace and
``paged_attention_reduce_kernel`` merges the splits; without, it writes the output directly.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import pdl_enter


@triton.jit
def _find_seq(cu_q, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s with cu_q[s] // BLOCK_Q + s <= pid."""
    lo = pid * 0
    hi = lo + num_seqs - 1  # a tensor even when Triton specializes num_seqs == 1 to a constant (loop-carried)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        start = tl.load(cu_q + mid) // BLOCK_Q + mid
        lo = tl.where(start <= pid, mid, lo)
        hi = tl.where(start <= pid, hi, mid - 1)
    return lo


@triton.jit
def _attend_tiles(
    qt, pos, k_cache, v_cache, table, kvh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    kv_lo, kv_hi, t_lo, t_hi, qk_scale, window,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Online softmax of the tile's queries qt [BLOCK_M, D_PAD] (at positions pos) over key tiles t_lo..t_hi-1
    of [kv_lo, kv_hi), keys looked up page by page in the sequence's block table: (max, sum, unnormalized out)."""
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked tiles give p = 0, not NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for t in range(t_lo, t_hi):
        kpos = kv_lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = kpos < kv_hi
        page = tl.load(table + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        off = kpos % BLOCK_SIZE
        k_ptrs = k_cache + page[None, :] * stride_kb + off[None, :] * stride_kt + kvh * stride_kh + d[:, None]
        kt = tl.load(k_ptrs, mask=k_ok[None, :] & d_ok[:, None], other=0.0).to(qt.dtype)  # [D_PAD, BLOCK_N]
        s = tl.dot(qt, kt, input_precision=PREC) * qk_scale
        visible = k_ok[None, :] & (kpos[None, :] <= pos[:, None])
        if WINDOW:
            visible = visible & (kpos[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_cache + page[:, None] * stride_vb + off[:, None] * stride_vt + kvh * stride_vh + d[None, :]
        vt = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(qt.dtype)  # [BLOCK_N, D_PAD]
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def paged_attention_kernel(
    q, k_cache, v_cache, out, part_o, part_lse,
    cu_q, ctx_lens, tables,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_tab, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
    num_seqs, num_splits, qk_scale, window,
    G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, WINDOW: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_seq(cu_q, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_q + seq)
    q_len = tl.load(cu_q + seq + 1) - q_start
    first = (pid - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first query token of this block, within the sequence
    if first >= q_len:
        return
    ctx = tl.load(ctx_lens + seq)
    rows = tl.arange(0, BLOCK_M)  # >= BLOCK_Q * G_PAD: tl.dot needs 16 rows, a decode tile may hold fewer
    tok = first + rows // G_PAD
    g = rows % G_PAD
    row_ok = (rows < BLOCK_Q * G_PAD) & (tok < q_len) & (g < G)
    head = kvh * G + g
    pos = ctx - q_len + tok  # each query's position in its sequence
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q_ptrs = q + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    qt = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # keys this block can see: [kv_lo, kv_hi), split into NUM tiles shared out between the splits
    kv_hi = ctx - q_len + tl.minimum(first + BLOCK_Q, q_len)
    kv_lo = 0
    if WINDOW:
        kv_lo = tl.maximum(ctx - q_len + first - window + 1, 0) // BLOCK_N * BLOCK_N
    n_tiles = tl.cdiv(kv_hi - kv_lo, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    t_lo = split * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)

    m_i, l_i, acc = _attend_tiles(
        qt, pos, k_cache, v_cache, tables + seq * stride_tab, kvh,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        kv_lo, kv_hi, t_lo, t_hi, qk_scale, window,
        HEAD_DIM, D_PAD, BLOCK_SIZE, BLOCK_M, BLOCK_N, WINDOW, PREC,
    )  # fmt: skip

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    ok = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        t_idx = (q_start + tok).to(tl.int64)
        po = part_o + t_idx[:, None] * stride_pt + head[:, None] * stride_ph + split * stride_ps + d[None, :]
        tl.store(po, o, mask=ok & (t_lo < t_hi))  # an empty split leaves its o unwritten (weight 0 in the merge)
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(part_lse + t_idx * stride_lt + head * stride_lh + split, lse, mask=row_ok)
    else:
        o_ptrs = out + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, o.to(out.dtype.element_ty), mask=ok)


@triton.jit
def paged_attention_reduce_kernel(
    out, part_o, part_lse, stride_ot, stride_oh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
    num_splits, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """out[t, h] = sum_s 2^(lse_s - M) * o_s / sum_s 2^(lse_s - M), M = max_s lse_s (empty splits: lse = -inf)."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    s_ok = s < num_splits
    lse = tl.load(part_lse + t * stride_lt + h * stride_lh + s, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0))  # empty splits (lse = -inf) weigh 0
    ok = s_ok[:, None] & (d < HEAD_DIM)[None, :]
    ok = ok & (lse > float("-inf"))[:, None]  # an empty split's o was never written
    o = tl.load(part_o + t * stride_pt + h * stride_ph + s[:, None] * stride_ps + d[None, :], mask=ok, other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)  # no visible key at all: zeros
    tl.store(out + t * stride_ot + h * stride_oh + d, res.to(out.dtype.element_ty), mask=d < HEAD_DIM)
