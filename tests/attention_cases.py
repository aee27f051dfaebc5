"""Random paged-attention batches shared by the attention kernel tests (CPU interpreter and GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttnCase:
    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor  # int32 [S + 1]
    ctx_lens: torch.Tensor  # int32 [S]
    block_tables: torch.Tensor  # int32 [S, width]
    max_q_len: int
    max_ctx_len: int

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.k_cache, self.v_cache, self.cu_seqlens_q, self.ctx_lens, self.block_tables


def make_case(
    spans: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str = "cpu",
    seed: int = 0,
    extra_width: int = 1,
    min_blocks: int = 0,
) -> AttnCase:
    """spans: (query count, context length) per sequence, in batch order (q_len 0 = a padding sequence).

    Each sequence owns distinct blocks of a shuffled pool (so a wrong table lookup reads someone else's keys);
    table columns past a sequence's blocks hold garbage block ids that the kernel must never follow.
    """
    gen = torch.Generator().manual_seed(seed)
    need = [-(-ctx // block_size) for _, ctx in spans]
    width = max(need, default=1) + extra_width
    num_blocks = max(sum(need) + 2, min_blocks)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(spans), width), 10**6, dtype=torch.int32)  # out of range on purpose
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = perm[used : used + n].int()
        used += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    q_lens = [n for n, _ in spans]
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)
    ctx = torch.tensor([c for _, c in spans], dtype=torch.int32)
    to = dict(device=device)
    return AttnCase(q.to(**to), k.to(**to), v.to(**to), cu.to(**to), ctx.to(**to), tables.to(**to),
                    max(q_lens, default=1), max((c for _, c in spans), default=1))  # fmt: skip
