"""Paged varlen attention: decode rows and prefill chunks of one flattened batch in one launch (Triton).

KV cache layout, per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]; token position
p of sequence s lives at block block_tables[s, p // block_size], offset p % block_size. K/V are read in place
through the block tables: no gather, no padding to the longest context.

Semantics of ``paged_attention(q, k_cache, v_cache, cu_seqlens_q, ctx_lens, block_tables, scale, ...)``
(fp32 softmax; G = H // KVH query heads share KV head h // G):

    for s in range(num_seqs):
        qs = q[cu_seqlens_q[s] : cu_seqlens_q[s + 1]]        # n queries, the last n of a context of c tokens
        n, c = len(qs), ctx_lens[s]
        keys = [k_cache[block_tables[s, p // block_size], p % block_size] for p in range(c)]   # [c, KVH, D]
        for i in range(n):
            pos = c - n + i                                   # query i sits at position c - n + i
            visible = [j for j in range(c) if j <= pos and (not sliding_window or j > pos - sliding_window)]
            for h in range(H):
                w = softmax(scale * qs[i, h].float() @ keys[visible, h // G].float().T)
                out[cu_seqlens_q[s] + i, h] = (w @ values[visible, h // G].float()).to(out.dtype)

Padding of a static batch: a sequence may have no queries (cu_seqlens_q[s + 1] == cu_seqlens_q[s]), and
queries at negative positions (ctx_lens[s] < q_len, e.g. padding tokens as one sequence with ctx 0) see no
key and get zeros; both cost an early exit. Rows no sequence covers (t >= cu_seqlens_q[-1]) are unspecified.

Split-KV (flash-decoding): with ``num_splits > 1`` every (query block, KV head) program covers 1/num_splits of
the key tiles its queries see, writes a normalized partial output and its log-sum-exp to an fp32 workspace,
and a second kernel merges the splits. The default picks splits from the programs that have work and
``max_ctx_len`` so that a small batch with long contexts still fills the GPU.

Every argument that varies per step is a device tensor of a fixed shape and the launch grid depends only on
shapes and the two bucketed ints (max_q_len, max_ctx_len): no host synchronisation, CUDA-graph capturable.
``paged_attention`` always runs the Triton kernels (on the CPU under TRITON_INTERPRET=1);
``hotlora.kernels.reference.paged_attention_ref`` is the torch reference.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from ._interp_compat import install as _install_interp_compat
from ._launch import pdl_args, use_triton
from .reference import FP8_KV

__all__ = ["AttentionConfig", "attention_tiles", "default_num_splits", "launch_plan", "paged_attention", "use_triton",
           "work_programs"]

BLOCK_N = 64  # keys per tile


@dataclass(frozen=True, slots=True)
class AttentionConfig:
    """Launch parameters of the attention kernel (bench/attention.py --sweep measures others)."""

    block_n: int = BLOCK_N  # keys per tile
    warps: int = 4
    stages: int = 2


# Launch configs swept on the H200 (bench/attention.py --sweep; BENCHMARKS.md, twenty-fourth session).
# Decode rows, split or not: 128-key tiles, three stages (the best of 48 configs at B=8 and 14, contexts 1,100-1,500,
# and at B=32, contexts 1,100-1,500 and 2,048: e.g. B=32 ctx=2048 80.0 us against 113.1 with 64-key tiles)
DECODE = AttentionConfig(block_n=128, warps=4, stages=3)
# A split launch with prefill chunks: 32-key tiles, three stages (a prefix-cache hit's step, 14 decode rows and a
# 160-query chunk at 1,184: 55.0 us with 2 splits against 64.9 unsplit; 64-key tiles split gained nothing)
MIXED_SPLIT = AttentionConfig(block_n=32, warps=4, stages=3)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def attention_tiles(max_q_len: int, group: int) -> tuple[int, int]:
    """(BLOCK_Q query tokens per program, G_PAD head rows per token): decode-sized tiles of >= 16 rows when
    every sequence has one query, 64-row tiles for prefill chunks."""
    g_pad = _pow2(group)
    target = 16 if max_q_len <= 1 else 64
    return min(_pow2(max(max_q_len, 1)), max(1, target // g_pad)), g_pad


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def work_programs(tokens: int, block_q: int, kv_heads: int) -> int:
    """The programs of a launch over `tokens` query tokens that have work, for the split choice (an upper bound
    from shapes only, capture-safe): one per decode row (block_q 1; a graph bucket's row count), else an estimate of
    twice the chunks' query blocks (as many decode rows beside them). The grid's other programs (a padded graph
    batch's empty sequences) exit at once and must not count: with them a decode bucket of 16 rows looked full and
    ran unsplit (above 35.4 us a layer at 14 rows, contexts 1,100-1,500, on the H200, against 32.5 split)."""
    return kv_heads * (tokens if block_q == 1 else 2 * -(-tokens // block_q))


GRID_SPLITS = os.environ.get("HOTLORA_ATTN_GRID_SPLITS") == "1"


def launch_plan(device: torch.device, tokens: int, num_seqs: int, kv_heads: int, group: int, max_q_len: int,
                max_ctx_len: int, num_splits: int | None = None,
                config: AttentionConfig | None = None) -> tuple[AttentionConfig, int]:  # fmt: skip
    """(config, KV splits) of a launch. On CUDA, unless the caller gives them: splits by the programs that have
    work (work_programs, default_num_splits); DECODE for decode rows, MIXED_SPLIT for a split launch with chunks,
    else AttentionConfig(). HOTLORA_ATTN_GRID_SPLITS=1: the choice before the twenty-fourth session (the whole
    grid counted, DECODE only when unsplit)."""
    cfg = config or AttentionConfig()
    block_q, _ = attention_tiles(max_q_len, group)
    cuda, decode = device.type == "cuda", max_q_len <= 1
    if GRID_SPLITS:
        grid = (tokens // block_q + num_seqs) * kv_heads
        splits = num_splits or default_num_splits(device, grid, max_ctx_len, cfg.block_n, per_sm=2.0)
        return (DECODE if config is None and decode and splits == 1 and cuda else cfg), splits
    if config is None and cuda and decode:
        cfg = DECODE
    splits = num_splits or default_num_splits(device, work_programs(tokens, block_q, kv_heads), max_ctx_len,
                                              cfg.block_n)  # fmt: skip
    if config is None and cuda and not decode and splits > 1:
        cfg = MIXED_SPLIT
    return cfg, splits


def default_num_splits(device: torch.device, programs: int, max_ctx_len: int, block_n: int = BLOCK_N,
                       per_sm: float = 1.5) -> int:  # fmt: skip
    """KV splits (a power of two, at most 32) until programs x splits reach `per_sm` per SM, with at least 4 key
    tiles per split; 1 on CPU. Sweeps (DECODE) put the knee at 1.5: B=8 rows x 8 KV heads best at 4 splits, B=14 at
    2, B=32 unsplit (2.0: the choice before the twenty-fourth session)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return splits_for(programs, max_ctx_len, block_n, _sm_count(index), per_sm)


def splits_for(programs: int, max_ctx_len: int, block_n: int, sms: int, per_sm: float = 1.5) -> int:
    """default_num_splits on a GPU of `sms` multiprocessors."""
    splits = 1
    while splits < 32 and programs * splits < per_sm * sms and max_ctx_len >= 4 * block_n * 2 * splits:
        splits *= 2
    return splits


@functools.cache
def _placeholders(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=device),
            torch.zeros(1, 1, 1, dtype=torch.float32, device=device))  # fmt: skip


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
           ctx_lens: torch.Tensor, block_tables: torch.Tensor, out: torch.Tensor) -> None:  # fmt: skip
    if q.dtype not in _FLOATS or k_cache.dtype not in (q.dtype, FP8_KV) or v_cache.dtype != k_cache.dtype \
            or out.dtype != q.dtype:  # fmt: skip
        raise TypeError(f"q and out must share one of fp16/bf16/fp32, and k_cache, v_cache be that or {FP8_KV}; got "
                        f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}, {out.dtype}")  # fmt: skip
    if q.dim() != 3 or q.stride(2) != 1 or out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"q and out must be [T, H, D] with unit last stride, got {tuple(q.shape)} {q.stride()}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError(f"k_cache/v_cache must be [blocks, block_size, KVH, D] with unit last stride, got "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")  # fmt: skip
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != q.shape[2] or heads % kv_heads:
        raise ValueError(f"head_dim {q.shape[2]} vs cache {k_cache.shape[3]}; {heads} heads over {kv_heads} KV heads")
    num_seqs = ctx_lens.shape[0]
    for name, t, shape in (("cu_seqlens_q", cu_seqlens_q, (num_seqs + 1,)), ("ctx_lens", ctx_lens, (num_seqs,))):
        if t.dtype != torch.int32 or t.shape != shape or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous int32 {list(shape)}, got {t.dtype} {tuple(t.shape)}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != num_seqs \
            or block_tables.stride(1) != 1:  # fmt: skip
        raise ValueError(f"block_tables must be int32 [{num_seqs}, width] with unit column stride")
    tensors = (k_cache, v_cache, cu_seqlens_q, ctx_lens, block_tables, out)
    if any(t.device != q.device for t in tensors):
        raise ValueError("all tensors must be on q's device")


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    ctx_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    max_q_len: int,
    max_ctx_len: int,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Causal attention of every query against its sequence's paged context; semantics in the module docstring.

    q: [T, H, D] fp16/bf16/fp32 (unit last stride; row and head strides free, e.g. a view of a fused qkv).
    k_cache, v_cache: [num_blocks, block_size, KVH, D], q's dtype or float8_e4m3fn (read as q's dtype: an fp8
        value converts exactly), unit last stride; H % KVH == 0.
    cu_seqlens_q: int32 [S + 1], non-decreasing, cu_seqlens_q[0] == 0, cu_seqlens_q[S] <= T.
    ctx_lens: int32 [S]: context length of s including its queries, whose K/V are already in the cache.
    block_tables: int32 [S, width], unit column stride; entries beyond a sequence's blocks are never read.
    max_q_len: an upper bound (bucketed) of the per-sequence query counts; picks the tile shape, and with T the
        default config and split count (``launch_plan``).
    max_ctx_len: an upper bound (bucketed) of ctx_lens; bounds the default split count.
    sliding_window: None/0 for full attention, else query at position p sees keys p - window < j <= p.
    num_splits: KV splits (>= 1); None = ``launch_plan``'s.
    out: [T, H, D] written in place (and returned); None allocates it.
    config: launch parameters; None = ``launch_plan``'s (on CUDA DECODE or MIXED_SPLIT where they apply).
    """
    out = torch.empty_like(q) if out is None else out
    _check(q, k_cache, v_cache, cu_seqlens_q, ctx_lens, block_tables, out)
    _install_interp_compat()
    from ._attention_triton import paged_attention_kernel, paged_attention_reduce_kernel

    tokens, heads, head_dim = q.shape
    num_seqs, kv_heads = ctx_lens.shape[0], k_cache.shape[2]
    if tokens == 0 or num_seqs == 0:
        return out
    group = heads // kv_heads
    block_q, g_pad = attention_tiles(max_q_len, group)
    grid_q = tokens // block_q + num_seqs
    cfg, splits = launch_plan(q.device, tokens, num_seqs, kv_heads, group, max_q_len, max_ctx_len, num_splits, config)
    if splits > 1:
        part_o = torch.empty(tokens, heads, splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(tokens, heads, splits, dtype=torch.float32, device=q.device)
    else:  # unused by the kernel: any fp32 tensors with the right rank
        part_o, part_lse = _placeholders(q.device)
    d_pad = max(16, _pow2(head_dim))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32: exact products; fp16/bf16 ignore it
    paged_attention_kernel[(grid_q, kv_heads, splits)](
        q, k_cache, v_cache, out, part_o, part_lse,
        cu_seqlens_q, ctx_lens, block_tables,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), *part_o.stride()[:3], *part_lse.stride()[:2],
        num_seqs, splits, scale * 1.4426950408889634, sliding_window or 0,
        G=group, G_PAD=g_pad, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=k_cache.shape[1], BLOCK_Q=block_q,
        BLOCK_M=max(16, block_q * g_pad), BLOCK_N=cfg.block_n, SPLIT=splits > 1, WINDOW=bool(sliding_window), PREC=prec,
        num_warps=cfg.warps, num_stages=cfg.stages, **pdl_args(q),
    )  # fmt: skip
    if splits > 1:
        paged_attention_reduce_kernel[(tokens, heads)](
            out, part_o, part_lse, out.stride(0), out.stride(1), *part_o.stride()[:3], *part_lse.stride()[:2],
            splits, HEAD_DIM=head_dim, D_PAD=d_pad, S_PAD=max(2, _pow2(splits)), **pdl_args(q),
        )  # fmt: skip
    return out
