"""Every engine step (decodes, prefill chunks, and both mixed) replayed from CUDA graphs.

An eager step is bound by host work, not by the device: Python, argument checks and thousands of kernel
launches per step (an eager ``lora_apply`` alone costs ~220 us of host time against ~30-45 us on the GPU;
BENCHMARKS.md). A step therefore runs on static buffers, padded to a bucket, replayed from a graph. A bucket's
key is (tokens, decode only, LoRA rank class):

- tokens: the step's token count, padded to the next of 1, 2, 4, 8, 16, 24, 32, ... max_num_seqs (decode-sized
  steps), then 1.5x and 2x powers of two up to max_num_batched_tokens;
- decode-only or not: a step whose sequences all decode uses decode-sized attention tiles;
- LoRA rank class: 0 for a batch without any adapter (it skips the LoRA launches), else the rank tile of the
  LoRA kernels (16, 32 or 64; kernels/_meta.py "Rank classes"): the step's largest adapter rank rounded up to a
  class (``step_rank_class``). Decode steps and mixed steps alike: with r=16 adapters, 64-row tiles cost a
  batch-32 decode step 20% of its speed, and the mixed steps of saturated serving and of a prefix-cache hit
  carry dozens of adapters too (BENCHMARKS.md, seventeenth session).

With M token buckets, D of them decode-sized (<= max_num_seqs), and C rank classes (the pool's max rank rounded
up, from 16: C = 3 for max_lora_rank 64; C = 1 with lora_rank_classes off), there are (D + M) * (1 + C) graphs
(``graph_count``): 312 at the CUDA defaults (256 sequences, 4096 tokens) and rank 64, against 156 with one class.

The attention metadata has a fixed shape per bucket: S = min(tokens, max_num_seqs) + 1 sequence rows. The
step's n sequences take rows 0..n-1, rows n..S-2 are empty (no queries, no context), and row S-1 holds the
padding tokens as queries without context (the kernel gives them zeros at the cost of an early exit). Padding
tokens embed token 0 at position 0, write their K/V into a block that no sequence owns (the runner allocates one
block more than the block manager hands out) and have no adapter; block tables are [S, max blocks per sequence]
and only the step's [n, width] corner is copied in (columns past a context are never read). The LoRA metadata
step runs inside the graph and reads the slot ids written into a static buffer, so every replay groups its own
step's adapters; the adapter slot tables (row pools, ranks, row_start, scale) are written in place by the slot
cache, so a replay sees adapters loaded after its capture. All graphs share one memory pool and one logits
buffer; ``capture_all`` captures every bucket at startup. A step that fits no bucket, or any step after a
failed capture, runs eagerly, with the same rank class (the runner picks it once per step, in ``StepInput``).

With capture=False the same padded static path runs eagerly (the CPU tests check it token for token against
the unpadded eager path).
"""

from __future__ import annotations

import array
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hotlora.adapters.cache import LoraSlotCache
from hotlora.kernels.lora import build_lora_meta, refresh_lora_meta
from hotlora.server.model.attention import AttentionMeta
from hotlora.server.model.llama import ForwardBatch, LlamaModel

log = logging.getLogger(__name__)


def _host(values: array.array, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor over `values`' memory (which it keeps alive). Converting a list through array.array is ~4x
    faster than torch.tensor(list): 0.22 against 0.81 ms for the 4,096-token bucket's 12,544 int64s, and 0.27
    against 1.5 ms for 240 block tables padded to 80 columns (dev CPU, eighteenth session)."""
    return torch.frombuffer(values, dtype=dtype)


def row_buckets(max_rows: int) -> list[int]:
    small = [r for r in (1, 2, 4, 8) if r < max_rows]
    return small + list(range(16, max_rows, 8)) + [max_rows]


def token_buckets(max_seqs: int, max_tokens: int) -> list[int]:
    """Decode-sized buckets up to max_num_seqs, then 1.5x/2x powers of two (96, 128, 192, ...) to max_tokens."""
    small = [r for r in row_buckets(max_seqs) if r < max_tokens]
    top = small[-1] if small else 1
    large, p = [], 1 << (top.bit_length() - 1)
    while p < max_tokens:
        large += [t for t in (p + p // 2, 2 * p) if top < t < max_tokens]
        p *= 2
    return small + large + [max_tokens]


def step_rank_class(rank: int, classes: Sequence[int]) -> int:
    """The LoRA rank class of a step whose adapters' largest rank is ``rank`` (0: no adapter, class 0): the
    smallest of ``classes`` (ascending: ``kernels.lora.rank_classes(max_lora_rank)``, or only its largest one)
    that holds it, else the largest (larger ranks loop)."""
    if rank <= 0:
        return 0
    return next((c for c in classes if c >= rank), classes[-1])


def graph_count(max_seqs: int, max_tokens: int, num_classes: int) -> int:
    """Graphs ``capture_all`` captures: (D + M) * (1 + C), for M token buckets, D decode-sized ones among them
    (decode-only and mixed keys) and C rank classes (plus class 0, no LoRA)."""
    tokens = token_buckets(max_seqs, max_tokens)
    decode = sum(t <= max_seqs for t in tokens)
    return (decode + len(tokens)) * (1 + num_classes)


@dataclass(slots=True)
class StepInput:
    """One step's flattened batch, as host lists (built by the runner)."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]  # KV cache slot of each token
    lora_slots: list[int]
    sample_idx: list[int]  # tokens whose logits are needed
    q_lens: list[int]  # per sequence
    ctx_lens: list[int]  # per sequence, including this step's tokens
    tables: list[list[int]]  # per sequence: its block table
    lora_class: int  # LoRA rank class (``step_rank_class``); 0: no token has an adapter


@dataclass(slots=True)
class _Bucket:
    tokens: int
    seqs: int  # sequence rows S (the last one holds the padding tokens)
    i64: torch.Tensor  # [3 * tokens + seqs - 1]: ids, positions, KV slots, sample_idx
    i32: torch.Tensor  # [2 * seqs + 1 + tokens]: cu_seqlens_q, ctx_lens, LoRA slots
    batch: ForwardBatch
    graph: torch.cuda.CUDAGraph | None = None


class StepGraphs:
    """max_rank sizes the LoRA workspace; rank_classes (ascending) are the classes a step can take."""

    def __init__(self, model: LlamaModel, lora_cache: LoraSlotCache, pad_block: int, block_size: int,
                 max_seqs: int, max_tokens: int, max_width: int, max_ctx: int, max_rank: int,
                 rank_classes: Sequence[int], capture: bool) -> None:  # fmt: skip
        self.model, self.lora_cache = model, lora_cache
        self.pad_block, self.block_size, self.max_rank = pad_block, block_size, max_rank
        self.rank_classes = tuple(rank_classes)
        self.max_seqs, self.max_width, self.max_ctx = max_seqs, max_width, max_ctx
        self.tokens = token_buckets(max_seqs, max_tokens)
        self.capture = capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.buckets: dict[tuple[int, bool, int], _Bucket] = {}  # (tokens, decode only, LoRA rank class)
        self.replays: dict[tuple[int, bool, int], int] = {}
        self.failed: str | None = None  # a capture failed: every step runs eagerly from then on
        self.capture_seconds = 0.0  # startup cost of capture_all
        # one logits buffer for all graphs (each graph's own output would pin [rows, vocab] fp32 per bucket)
        self.logits = torch.empty(0)
        if capture:
            self.logits = torch.empty(max_seqs, model.lm_head.shape[0], dtype=torch.float32, device=model.device)

    def keys(self) -> list[tuple[int, bool, int]]:
        """Every bucket a step can use (``graph_count`` of them)."""
        keys = []
        for t in self.tokens:
            for decode in (True, False) if t <= self.max_seqs else (False,):
                keys += [(t, decode, c) for c in (0, *self.rank_classes)]
        return keys

    def capture_all(self) -> None:
        """Capture every bucket now (startup), with a progress line per bucket and the total time."""
        start, keys = time.perf_counter(), self.keys()
        for i, key in enumerate(keys, 1):
            bucket = self.buckets.get(key) or self._build(*key)
            if bucket.graph is None and not self._try_capture(bucket):
                return
            log.info("CUDA graphs: %d/%d captured (%d tokens, %s, LoRA rank class %d), %.1f s", i, len(keys),
                     key[0], "decode" if key[1] else "mixed", key[2], time.perf_counter() - start)  # fmt: skip
        self.capture_seconds = time.perf_counter() - start
        log.info("CUDA graphs: all %d captured in %.1f s", len(keys), self.capture_seconds)

    def stage(self, step: StepInput) -> _Bucket | None:
        """The step's bucket with its static buffers filled (captured first if it is not yet), or None when
        the step must run eagerly. The host half of a step; replay() then only launches it."""
        n, num_tokens = len(step.q_lens), len(step.input_ids)
        width = max(len(t) for t in step.tables)
        if self.failed or num_tokens > self.tokens[-1] or n > self.max_seqs or width > self.max_width:
            return None
        tokens = next(t for t in self.tokens if t >= num_tokens)
        key = (tokens, all(q == 1 for q in step.q_lens), step.lora_class)
        b = self.buckets.get(key) or self._build(*key)
        self._fill(b, step, width)
        if self.capture and b.graph is None and not self._try_capture(b):
            return None
        self.replays[key] = self.replays.get(key, 0) + 1
        return b

    def replay(self, b: _Bucket, rows: int) -> torch.Tensor:
        """Logits [rows, vocab] of the staged bucket (asynchronous on CUDA)."""
        if not self.capture:
            return self._run(b)[:rows]
        b.graph.replay()
        return self.logits[:rows]

    def _fill(self, b: _Bucket, step: StepInput, width: int) -> None:
        n, pad = len(step.q_lens), b.tokens - len(step.input_ids)
        empty = b.seqs - 1 - n
        cu = [0]
        for q in step.q_lens:
            cu.append(cu[-1] + q)
        pad_slot = self.pad_block * self.block_size
        i64 = (step.input_ids + [0] * pad) + (step.positions + [0] * pad) + (step.slots + [pad_slot] * pad)
        i64 += step.sample_idx + [0] * (b.seqs - 1 - len(step.sample_idx))
        i32 = cu + [cu[-1]] * empty + [b.tokens]
        i32 += step.ctx_lens + [0] * (empty + 1) + step.lora_slots + [-1] * pad
        # non-blocking: the host lists are staged at once, and the copies queue behind a step still in flight
        # that reads these buffers (a blocking copy would wait for it: no asynchronous scheduling)
        b.i64.copy_(_host(array.array("q", i64), torch.int64), non_blocking=True)
        b.i32.copy_(_host(array.array("i", i32), torch.int32), non_blocking=True)
        tables = array.array("i", [self.pad_block]) * (n * width)
        for i, t in enumerate(step.tables):
            tables[i * width : i * width + len(t)] = array.array("i", t)
        b.batch.attn.block_tables[:n, :width].copy_(_host(tables, torch.int32).view(n, width), non_blocking=True)

    def _build(self, tokens: int, decode: bool, lora_class: int) -> _Bucket:
        dev, seqs = self.model.device, min(tokens, self.max_seqs) + 1
        i64 = torch.zeros(3 * tokens + seqs - 1, dtype=torch.int64, device=dev)
        i32 = torch.zeros(2 * seqs + 1 + tokens, dtype=torch.int32, device=dev)
        i32[seqs] = tokens  # until the first fill: every token a padding query
        i64[2 * tokens : 3 * tokens] = self.pad_block * self.block_size
        tables = torch.full((seqs, self.max_width), self.pad_block, dtype=torch.int32, device=dev)
        attn = AttentionMeta(slot_mapping=i64[2 * tokens : 3 * tokens], cu_seqlens_q=i32[: seqs + 1],
                             ctx_lens=i32[seqs + 1 : 2 * seqs + 1], block_tables=tables,
                             max_q_len=1 if decode else tokens, max_ctx_len=self.max_ctx)  # fmt: skip
        lora = None
        if lora_class:
            cache = self.lora_cache
            lora = build_lora_meta(i32[2 * seqs + 1 :], cache.row_start, cache.scale, self.max_rank,
                                   rank_class=lora_class)
        batch = ForwardBatch(input_ids=i64[:tokens], positions=i64[tokens : 2 * tokens], attn=attn, lora=lora,
                             sample_idx=i64[3 * tokens :])  # fmt: skip
        bucket = _Bucket(tokens, seqs, i64, i32, batch)
        self.buckets[(tokens, decode, lora_class)] = bucket
        return bucket

    def _run(self, b: _Bucket) -> torch.Tensor:
        if b.batch.lora is not None:
            refresh_lora_meta(b.batch.lora)
        return self.model.forward(b.batch)

    def _try_capture(self, b: _Bucket) -> bool:
        try:
            # the graph and its streams on the model's device (cuda:N); no adapter copy is issued from the copy
            # thread meanwhile (its allocations would break a global-mode capture)
            with self.lora_cache.copy_lock, torch.cuda.device(self.model.device):
                self._capture(b)
        except Exception as exc:  # e.g. an operator that cannot be captured: stay correct, run eagerly
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture failed, running eagerly from now on: %s", self.failed)
            return False
        return True

    def _capture(self, b: _Bucket) -> None:
        current = torch.cuda.current_stream(self.model.device)
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._run(b)  # warm-up outside the capture: Triton compiles, cuBLAS and bitsandbytes settle
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self._run(b)
            self.logits[: logits.shape[0]].copy_(logits)
        b.graph = graph
