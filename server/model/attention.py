"""Paged attention over one flattened token batch (torch; the CPU path and the GPU fallback).

KV cache layout, per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim].
Token slot s lives at block s // block_size, offset s % block_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMeta:
    """Where each sequence's queries sit in the flattened batch, and its KV blocks.

    Sequences [0, num_decode) are decodes (one query, the last position); the rest are prefill chunks.
    """

    slot_mapping: torch.Tensor  # int64 [T]: cache slot of each new token
    num_decode: int
    decode_block_tables: torch.Tensor  # int64 [num_decode, max_blocks] (padded with 0)
    decode_ctx_lens: torch.Tensor  # int64 [num_decode]
    prefill_spans: list[tuple[int, int, int]]  # (first query token in batch, query count, context length)
    prefill_block_tables: list[torch.Tensor]  # int64 [blocks] per prefill chunk


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """k_cache.view(-1, KVH, D)[slots] = k (and v): k, v [T, KVH, D]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: [length, KVH, D]."""
    return cache[block_table].flatten(0, 1)[:length]


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta, scale: float
) -> torch.Tensor:
    """Causal attention of q [T, H, D] against the cached context of each sequence; returns [T, H, D]."""
    out = torch.empty_like(q)
    if meta.num_decode:
        out[: meta.num_decode] = _decode_attention(q[: meta.num_decode], k_cache, v_cache, meta, scale)
    for (start, n, ctx), table in zip(meta.prefill_spans, meta.prefill_block_tables, strict=True):
        k = _gather(k_cache, table, ctx).transpose(0, 1)  # [KVH, ctx, D]
        v = _gather(v_cache, table, ctx).transpose(0, 1)
        qs = q[start : start + n].transpose(0, 1)  # [H, n, D]
        if n == ctx:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # query i sits at position ctx - n + i and sees keys 0 .. ctx - n + i
            pos = torch.arange(ctx - n, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= pos[:, None]
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + n] = o.transpose(0, 1)
    return out


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta, scale: float
) -> torch.Tensor:
    """One query per sequence, padded to the longest context: q [B, H, D] -> [B, H, D]."""
    tables, lens = meta.decode_block_tables, meta.decode_ctx_lens
    k = k_cache[tables].flatten(1, 2).transpose(1, 2)  # [B, KVH, L, D]
    v = v_cache[tables].flatten(1, 2).transpose(1, 2)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < lens[:, None]  # [B, L]
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return o.squeeze(2)
