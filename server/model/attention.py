"""Paged attention over one flattened token batch: the metadata, the KV write, and the kernel dispatch.

KV cache layout, per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim].
Token slot s lives at block s // block_size, offset s % block_size. Semantics of the attention:
hotlora.kernels.attention (the Triton kernel) and hotlora.kernels.reference.paged_attention_ref (torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hotlora.kernels.attention import paged_attention as paged_attention_triton
from hotlora.kernels.attention import use_triton
from hotlora.kernels.reference import FP8_KV, AttentionPlanRef, paged_attention_ref, plan_paged_attention_ref

# The torch reference pads the decodes of a step to the longest context and masks the rest, so it reads slots past
# a sequence's context: the stale KV of its blocks' previous owners (and block 0). Under the mask 0 x NaN and
# inf - inf are NaN, so a sequence whose activations overflowed (a mix or an adapter of huge weights) would poison
# the next owners of its blocks. On that path each step's new K and V are kept finite and within this bound, which
# no real model's K or V comes near (the Triton kernel never loads slots past a context).
KV_BOUND = 65504.0  # float16's largest value


@dataclass(slots=True)
class AttentionMeta:
    """Where each sequence's queries sit in the flattened batch, and its KV blocks; all on the device.

    Sequence s has queries cu_seqlens_q[s] : cu_seqlens_q[s + 1] (the last of its ctx_lens[s] tokens);
    a static (graph) batch pads with sequences of no queries and one sequence holding the padding tokens.
    """

    slot_mapping: torch.Tensor  # int64 [T]: cache slot of each new token
    cu_seqlens_q: torch.Tensor  # int32 [S + 1]
    ctx_lens: torch.Tensor  # int32 [S]: context length including this step's tokens
    block_tables: torch.Tensor  # int32 [S, width]: columns past a context are never read
    max_q_len: int  # bucketed upper bounds: they pick the kernel's tiles and KV splits, never a sync
    max_ctx_len: int
    # the torch reference's per-step plan, shared by all layers; keyed by the metadata tensors' versions, so
    # static (graph) buffers rewritten in place for the next step never reuse a stale one
    ref_plan: tuple[tuple[int, ...], AttentionPlanRef] | None = field(default=None, repr=False)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:  # fmt: skip
    """Causal attention of q [T, H, D] against the cached context of each sequence; returns [T, H, D]."""
    args = (q, k_cache, v_cache, meta.cu_seqlens_q, meta.ctx_lens, meta.block_tables, scale)
    if use_triton(q):
        return paged_attention_triton(*args, max_q_len=meta.max_q_len, max_ctx_len=meta.max_ctx_len,
                                      sliding_window=sliding_window)  # fmt: skip
    for cache in (k_cache, v_cache):
        _bound_new_kv(cache, meta.slot_mapping)
    key = (meta.cu_seqlens_q._version, meta.ctx_lens._version, meta.block_tables._version, sliding_window or 0)
    if meta.ref_plan is None or meta.ref_plan[0] != key:
        plan = plan_paged_attention_ref(meta.cu_seqlens_q, meta.ctx_lens, meta.block_tables, k_cache.shape[1],
                                        sliding_window)  # fmt: skip
        meta.ref_plan = (key, plan)
    return paged_attention_ref(*args, sliding_window=sliding_window, plan=meta.ref_plan[1])


def _bound_new_kv(cache: torch.Tensor, slots: torch.Tensor) -> None:
    """NaN to 0 and everything else clamped to +-KV_BOUND, in the cache slots this step wrote (see KV_BOUND)."""
    flat = cache.view(-1, *cache.shape[2:])
    new = flat[slots].float() if cache.dtype == FP8_KV else flat[slots]  # float8 has no nan_to_num on the CPU
    flat[slots] = new.nan_to_num(0.0, KV_BOUND, -KV_BOUND).clamp_(-KV_BOUND, KV_BOUND).to(cache.dtype)
