"""Torch references of the kernels (float32 math). They are also the CPU serving path.

LoRA row-pool layout and metadata: see hotlora.kernels._meta (re-exported by hotlora.kernels.lora).
Paged attention layout and semantics: see hotlora.kernels.attention.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._meta import LoraMeta, LoraSlice
from ._meta import refresh_lora_meta_torch as refresh_lora_meta_ref  # the metadata step's reference

__all__ = [
    "FP8_KV",
    "FP8_KV_MAX",
    "NF4_CODE",
    "NF4_NIBBLE",
    "NF4_NIBBLE_ORDER",
    "add_rms_norm_ref",
    "lora_apply_naive",
    "lora_apply_ref",
    "lora_expand_ref",
    "lora_shrink_ref",
    "nf4_dequantize_ref",
    "nf4_matmul_ref",
    "norm_shrink_ref",
    "paged_attention_ref",
    "refresh_lora_meta_ref",
    "rope_ref",
    "silu_mul_ref",
    "silu_mul_shrink_ref",
    "to_cache",
]


def _slot_groups(meta: LoraMeta) -> Iterator[tuple[int, torch.Tensor]]:
    """(slot, token indices) of every slot with at least one token, from the meta's grouping (host sync)."""
    bounds = meta.slot_bounds.tolist()
    tokens = meta.sorted_tokens.long()
    for slot in range(meta.num_slots):
        lo, hi = bounds[slot], bounds[slot + 1]
        if hi > lo:
            yield slot, tokens[lo:hi]


def lora_shrink_ref(x: torch.Tensor, slices: Sequence[LoraSlice], meta: LoraMeta) -> torch.Tensor:
    """h[i, t, :r] = x[t].float() @ slices[i].a[rows].float().T for every token t of a slot s with rank r > 0.

    x: [T, in]. Returns float32 [len(slices), T, meta.max_rank], zero where nothing was computed.
    rows = row_start[s] : row_start[s] + r.
    """
    h = torch.zeros(len(slices), x.shape[0], meta.max_rank, dtype=torch.float32, device=x.device)
    row_start = meta.row_start.tolist()
    for slot, idx in _slot_groups(meta):
        xs = x.index_select(0, idx).float()
        for i, sl in enumerate(slices):
            r = int(sl.rank[slot])
            if r > 0:
                a = sl.a[row_start[slot] : row_start[slot] + r].float()
                h[i, idx, :r] = xs @ a.T
    return h


def lora_expand_ref(ys: Sequence[torch.Tensor], h: torch.Tensor, slices: Sequence[LoraSlice], meta: LoraMeta) -> None:
    """ys[i][t] += scale[s] * h[i, t, :r] @ slices[i].b[rows].float(), in fp32, rounded once; in place.

    h: float32 [len(slices), T, >= max rank] (as returned by lora_shrink_ref). Tokens without an adapter,
    and slices with rank 0 for the token's slot, keep ys exactly.
    """
    row_start = meta.row_start.tolist()
    scale = meta.scale.tolist()
    for slot, idx in _slot_groups(meta):
        for i, sl in enumerate(slices):
            r = int(sl.rank[slot])
            if r > 0:
                b = sl.b[row_start[slot] : row_start[slot] + r].float()
                delta = scale[slot] * (h[i, idx, :r] @ b)
                ys[i].index_copy_(0, idx, (ys[i].index_select(0, idx).float() + delta).to(ys[i].dtype))


def lora_apply_ref(ys: Sequence[torch.Tensor], x: torch.Tensor, slices: Sequence[LoraSlice], meta: LoraMeta) -> None:
    """Grouped reference of ``lora_apply`` (the CPU serving path): tokens gathered once in slot order, two fp32
    matmuls per (slot, slice) on contiguous runs, one scatter per slice.

    For every token t with s = token_slots[t] >= 0 and every i with r = slices[i].rank[s] > 0:
        rows = row_start[s] : row_start[s] + r
        ys[i][t] = (ys[i][t].float() + scale[s] * (x[t].float() @ a[rows].float().T) @ b[rows].float()).to(dtype)
    """
    bounds = meta.slot_bounds.tolist()
    runs = [(slot, lo, hi) for slot, (lo, hi) in enumerate(itertools.pairwise(bounds)) if hi > lo]
    if not runs:
        return
    order = meta.sorted_tokens[: bounds[-1]].long()  # tokens with an adapter, grouped by slot
    xs = x.index_select(0, order).float()
    row_start, scale = meta.row_start.tolist(), meta.scale.tolist()
    for y, sl in zip(ys, slices, strict=True):
        ranks = sl.rank.tolist()
        deltas, tokens = [], []
        for slot, lo, hi in runs:
            r, start = ranks[slot], row_start[slot]
            if r == 0:
                continue
            h = xs[lo:hi] @ sl.a[start : start + r].float().T
            deltas.append((h @ sl.b[start : start + r].float()).mul_(scale[slot]))
            tokens.append(order[lo:hi])
        if deltas:
            idx = torch.cat(tokens)
            y.index_copy_(0, idx, (y.index_select(0, idx).float() + torch.cat(deltas)).to(y.dtype))


def lora_apply_naive(
    ys: Sequence[torch.Tensor],
    x: torch.Tensor,
    slices: Sequence[LoraSlice],
    token_slots: torch.Tensor,
    row_start: torch.Tensor,
    scale: torch.Tensor,
) -> None:
    """One token at a time, straight from the definition (float64 math); the oracle for the tests."""
    for t, slot in enumerate(token_slots.tolist()):
        if slot < 0:
            continue
        for y, sl in zip(ys, slices, strict=True):
            r = int(sl.rank[slot])
            if r == 0:
                continue
            rows = slice(int(row_start[slot]), int(row_start[slot]) + r)
            delta = float(scale[slot]) * ((x[t].double() @ sl.a[rows].double().T) @ sl.b[rows].double())
            y[t] = (y[t].double() + delta).to(y.dtype)


# bitsandbytes' NF4 code book (bnb.functional.get_4bit_type("nf4")), as fp32 values.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# The code each stored nibble stands for (hotlora.kernels.nf4's layout). Nibbles j and j + 8 hold codes of
# equal sign and equal bf16 exponent parity (the top bits of both bytes of their bf16 patterns agree, zero
# taken as -0.0): the in-register lookup (_nf4_triton._prmt_asm) needs that to merge its two table halves
# by one xor, with no mask.
NF4_NIBBLE_ORDER = (0, 4, 1, 5, 8, 12, 9, 13, 3, 6, 2, 7, 11, 15, 10, 14)
NF4_NIBBLE = tuple(NF4_CODE[c] for c in NF4_NIBBLE_ORDER)  # the value of each stored nibble


def nf4_dequantize_ref(w) -> torch.Tensor:
    """NF4Weight (hotlora.kernels.nf4) -> dense [N, K] in w.dtype, computed as dequantize_4bit does."""
    code = torch.tensor(NF4_NIBBLE, dtype=torch.float32, device=w.codes.device)
    n = w.codes.shape[0]
    groups = w.codes.view(n, -1, 64)  # 128-column groups: high nibbles = first 64 columns, low = next 64
    nibbles = torch.stack([groups >> 4, groups & 15], dim=2).reshape(n, -1).long()  # [N, Kp]
    vals = code[nibbles].view(n, -1, 64) * w.absmax[:, :, None]
    return vals.reshape(n, -1)[:, : w.in_features].to(w.dtype)


def nf4_matmul_ref(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(w).T (+ bias) with fp32 math, returned in x's dtype."""
    y = x.float() @ nf4_dequantize_ref(w).to(x.dtype).float().T
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def add_rms_norm_ref(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += delta (in place, if given); RMSNorm(h) * weight, normalised in fp32 and rounded to h's dtype."""
    if delta is not None:
        h.add_(delta)
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(h.dtype)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def norm_shrink_ref(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                    slices: Sequence[LoraSlice], meta: LoraMeta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of kernels.lora_fused.norm_shrink: (h + delta out of place, the normed x, lora_shrink_ref(x))."""
    h2 = h.clone()
    x = add_rms_norm_ref(h2, delta, weight, eps)
    return h2, x, lora_shrink_ref(x, slices, meta)


def silu_mul_shrink_ref(gate: torch.Tensor, up: torch.Tensor, slices: Sequence[LoraSlice],
                        meta: LoraMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of kernels.lora_fused.silu_mul_shrink: (silu_mul_ref(gate, up), lora_shrink_ref of it)."""
    y = silu_mul_ref(gate, up)
    return y, lora_shrink_ref(y, slices, meta)


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [T, H, Dh] and k [T, KVH, Dh] in place (rotate-half convention, tables [max_len, Dh])."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    for x in (q, k):
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        x.copy_(x * c + rotated * s)


FP8_KV = torch.float8_e4m3fn  # the KV caches' 8-bit element type (EngineConfig.kv_cache_dtype "fp8")
FP8_KV_MAX = 448.0  # its largest finite value: K and V are clamped to +-FP8_KV_MAX (unscaled), then rounded


def to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a KV cache of `dtype` stores it: unchanged for the model's dtype; for FP8_KV, x.float() clamped to
    +-FP8_KV_MAX and rounded to nearest even (the Triton kernels' conversion)."""
    if dtype != FP8_KV:
        return x
    return x.float().clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV)


def rope_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """rope_ref(q, k), then k and v [T, KVH, Dh] into the caches [blocks, block_size, KVH, Dh] at slots [T]
    (``to_cache`` for an FP8_KV cache)."""
    rope_ref(q, k, positions, cos, sin)
    for cache, x in ((k_cache, k), (v_cache, v)):
        x = to_cache(x, cache.dtype)
        if cache.dtype == FP8_KV:  # index_copy_ has no float8 CPU kernel: copy the bytes
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, x)


def _visible(pos: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """bool [..., length]: key j is visible from a query at position pos (causal, optional sliding window)."""
    j = torch.arange(length, device=pos.device)
    mask = j <= pos[..., None]
    if window:
        mask &= j > pos[..., None] - window
    return mask


@dataclass(frozen=True, slots=True)
class AttentionPlanRef:
    """What paged_attention_ref derives from the metadata alone: the same for every layer of a step."""

    cu: list[int]
    ctx: list[int]
    decode_rows: torch.Tensor | None  # int64 [B]: the query row of each decode
    decode_tables: torch.Tensor | None  # int64 [B, width]: their blocks (block 0 past a context)
    decode_mask: torch.Tensor | None  # bool [B, length]: keys each decode sees
    decode_len: int  # the longest decode context


def plan_paged_attention_ref(cu_seqlens_q: torch.Tensor, ctx_lens: torch.Tensor, block_tables: torch.Tensor,
                             block_size: int, sliding_window: int | None = None) -> AttentionPlanRef:
    """The metadata part of paged_attention_ref (host sync on the metadata), reusable across layers."""
    cu, ctx, dev = cu_seqlens_q.tolist(), ctx_lens.tolist(), block_tables.device
    decode = [s for s in range(len(ctx)) if cu[s + 1] - cu[s] == 1 and ctx[s] > 0]
    if not decode:
        return AttentionPlanRef(cu, ctx, None, None, None, 0)
    rows = torch.tensor([cu[s] for s in decode], device=dev)
    lens = torch.tensor([ctx[s] for s in decode], device=dev)
    length = max(ctx[s] for s in decode)
    width = -(-length // block_size)
    tables = block_tables[torch.tensor(decode, device=dev), :width].long()
    owned = torch.arange(width, device=dev) < (lens[:, None] + block_size - 1) // block_size
    tables = torch.where(owned, tables, 0)  # columns past a context may hold anything: read block 0 there
    mask = _visible(lens - 1, length, sliding_window) & (torch.arange(length, device=dev) < lens[:, None])
    return AttentionPlanRef(cu, ctx, rows, tables, mask, length)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    ctx_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    plan: AttentionPlanRef | None = None,
) -> torch.Tensor:
    """Reference of ``hotlora.kernels.attention.paged_attention`` (same arguments and semantics; fp32 math).

    Gathers each sequence's context from the paged cache. Sequences with one query (decodes) share one padded
    batched product; prefill chunks run one at a time. Queries at negative positions (ctx_lens[s] < q_len) and
    rows no sequence covers are zero. `plan`: plan_paged_attention_ref of the same metadata, if the caller has it.
    """
    out = torch.zeros_like(q)
    bs, dev = k_cache.shape[1], q.device
    if plan is None:
        plan = plan_paged_attention_ref(cu_seqlens_q, ctx_lens, block_tables, bs, sliding_window)
    cu, ctx = plan.cu, plan.ctx
    if plan.decode_rows is not None:
        length, rows = plan.decode_len, plan.decode_rows
        k = k_cache[plan.decode_tables].flatten(1, 2)[:, :length].transpose(1, 2).float()  # [B, KVH, L, D]
        v = v_cache[plan.decode_tables].flatten(1, 2)[:, :length].transpose(1, 2).float()
        o = F.scaled_dot_product_attention(q[rows].float().unsqueeze(2), k, v,
                                           attn_mask=plan.decode_mask[:, None, None, :], scale=scale,
                                           enable_gqa=True)  # fmt: skip
        out[rows] = o.squeeze(2).to(q.dtype)
    for s in range(len(ctx)):
        n, c = cu[s + 1] - cu[s], ctx[s]
        if n == 1 and c > 0:  # decodes ran above
            continue
        n, start = min(n, c), cu[s] + max(n - c, 0)  # queries at negative positions see nothing: zeros
        if n == 0:
            continue
        table = block_tables[s, : -(-c // bs)].long()
        k = k_cache[table].flatten(0, 1)[:c].transpose(0, 1).float()  # [KVH, c, D]
        v = v_cache[table].flatten(0, 1)[:c].transpose(0, 1).float()
        qs = q[start : start + n].transpose(0, 1).float()  # [H, n, D]
        mask = _visible(torch.arange(c - n, c, device=dev), c, sliding_window)
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + n] = o.transpose(0, 1).to(q.dtype)
    return out
