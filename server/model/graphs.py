"""Decode steps replayed from CUDA graphs.

An eager decode step is bound by host work, not by the device: Python, argument checks and thousands of kernel
launches per step (an eager ``lora_apply`` alone costs ~220 us of host time against ~30-45 us on the GPU;
BENCHMARKS.md). A step whose sequences all decode (one token each) therefore runs on static buffers, padded to
a bucket, and is replayed from a graph captured the first time a step needs that bucket:

- rows: the batch, padded to the next of 1, 2, 4, 8, 16, 24, 32, ... (the last bucket holds max_num_seqs);
- width: block-table columns, padded to the next power of two (at least 8, at most the longest context's);
- with or without LoRA: a batch without any adapter skips the LoRA launches.

Padding rows decode token 0 at position 0 into a KV block that no sequence owns (the runner allocates one
block more than the block manager hands out) with no adapter, and their logits are dropped; padding columns of
the block tables point at that block too, behind the context-length mask. The LoRA metadata step runs inside
the graph and reads the slot ids written into a static buffer, so every replay groups its own step's adapters;
the adapter slot tables (row pools, ranks, row_start, scale) are written in place by the slot cache, so a
replay sees adapters loaded after its capture. All graphs share one memory pool.

With capture=False the same padded static path runs eagerly (the CPU tests check it token for token against
the unpadded eager path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from hotlora.adapters.cache import LoraSlotCache
from hotlora.kernels.lora import build_lora_meta, refresh_lora_meta
from hotlora.server.engine.sequence import Sequence
from hotlora.server.model.attention import AttentionMeta
from hotlora.server.model.llama import ForwardBatch, LlamaModel

log = logging.getLogger(__name__)


def row_buckets(max_rows: int) -> list[int]:
    small = [r for r in (1, 2, 4, 8) if r < max_rows]
    return small + list(range(16, max_rows, 8)) + [max_rows]


@dataclass(slots=True)
class _Bucket:
    rows: int
    width: int
    ints: torch.Tensor  # int64 [rows * (5 + width)]: ids, positions, KV slots, context lengths, tables, LoRA slots
    batch: ForwardBatch
    lora_slots: torch.Tensor | None  # int32 [rows]: the LoRA meta's token_slots
    logits: torch.Tensor | None = None  # the graph's output
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    def __init__(self, model: LlamaModel, lora_cache: LoraSlotCache, pad_block: int, block_size: int,
                 max_rows: int, max_width: int, max_rank: int, capture: bool) -> None:  # fmt: skip
        self.model, self.lora_cache = model, lora_cache
        self.pad_block, self.block_size, self.max_rank = pad_block, block_size, max_rank
        self.rows = row_buckets(max_rows)
        self.max_width = max_width
        self.capture = capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.buckets: dict[tuple[int, int, bool], _Bucket] = {}
        self.failed: str | None = None  # a capture failed: every step runs eagerly from then on

    def forward(self, seqs: list[Sequence], lora_slots: list[int], input_ids: list[int], positions: list[int],
                slots: list[int]) -> torch.Tensor | None:  # fmt: skip
        """Logits [len(seqs), vocab] of a pure-decode step, or None when it must run eagerly."""
        n = len(seqs)
        width = max(len(s.block_table) for s in seqs)
        if self.failed or n > self.rows[-1] or width > self.max_width:
            return None
        rows = next(r for r in self.rows if r >= n)
        width = min(max(8, 1 << (width - 1).bit_length()), self.max_width)
        key = (rows, width, any(s >= 0 for s in lora_slots))
        b = self.buckets.get(key) or self._build(*key)
        pad, pad_slot = rows - n, self.pad_block * self.block_size
        tables = []
        for s in seqs:
            tables += s.block_table + [self.pad_block] * (width - len(s.block_table))
        values = (input_ids + [0] * pad) + (positions + [0] * pad) + (slots + [pad_slot] * pad)
        values += [s.num_computed + 1 for s in seqs] + [1] * pad
        values += tables + [self.pad_block] * (width * pad) + lora_slots + [-1] * pad
        b.ints.copy_(torch.tensor(values, dtype=torch.int64))
        if not self.capture:
            return self._run(b)[:n]
        if b.graph is None:
            try:
                self._capture(b)
            except Exception as exc:  # e.g. an operator that cannot be captured: stay correct, run eagerly
                self.failed = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graph capture failed, decoding eagerly from now on: %s", self.failed)
                return None
        b.graph.replay()
        return b.logits[:n]

    def _build(self, rows: int, width: int, use_lora: bool) -> _Bucket:
        dev = self.model.device
        ints = torch.zeros(rows * (5 + width), dtype=torch.int64, device=dev)
        ids, positions, slots, ctx = (ints[i * rows : (i + 1) * rows] for i in range(4))
        tables = ints[4 * rows : 4 * rows + rows * width].view(rows, width)
        lora_slots = lora = None
        if use_lora:
            lora_slots = torch.full((rows,), -1, dtype=torch.int32, device=dev)
            cache = self.lora_cache
            lora = build_lora_meta(lora_slots, cache.row_start, cache.scale, self.max_rank)
        attn = AttentionMeta(slot_mapping=slots, num_decode=rows, decode_block_tables=tables, decode_ctx_lens=ctx,
                             prefill_spans=[], prefill_block_tables=[])  # fmt: skip
        batch = ForwardBatch(input_ids=ids, positions=positions, attn=attn, lora=lora,
                             sample_idx=torch.arange(rows, device=dev))  # fmt: skip
        bucket = _Bucket(rows, width, ints, batch, lora_slots)
        self.buckets[(rows, width, use_lora)] = bucket
        return bucket

    def _run(self, b: _Bucket) -> torch.Tensor:
        if b.lora_slots is not None:
            b.lora_slots.copy_(b.ints[-b.rows :])
            refresh_lora_meta(b.batch.lora)
        return self.model.forward(b.batch)

    def _capture(self, b: _Bucket) -> None:
        # the graph and its streams on the model's device (cuda:N); no adapter copy is issued from the copy
        # thread meanwhile (its allocations would break a global-mode capture)
        with self.lora_cache.copy_lock, torch.cuda.device(self.model.device):
            self._capture_on_device(b)

    def _capture_on_device(self, b: _Bucket) -> None:
        current = torch.cuda.current_stream(self.model.device)
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._run(b)  # warm-up outside the capture: Triton compiles, cuBLAS and bitsandbytes settle
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            b.logits = self._run(b)
        b.graph = graph
        log.info("decode graph captured: %d rows, %d block columns, LoRA %s", b.rows, b.width, b.lora_slots is not None)
