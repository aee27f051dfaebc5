"""The model runner: the one place where scheduled sequences become tensors and tokens come back."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from hotlora.adapters.cache import LoraSlotCache
from hotlora.kernels.lora import build_lora_meta
from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.scheduler import ScheduledBatch
from hotlora.server.engine.sequence import Sequence
from hotlora.server.engine.types import TokenLogprob
from hotlora.server.model.attention import AttentionMeta
from hotlora.server.model.graphs import DecodeGraphs
from hotlora.server.model.llama import ForwardBatch, LlamaModel
from hotlora.server.model.sampler import SampleRequest, sample
from hotlora.server.model.weights import resolve_checkpoint

log = logging.getLogger(__name__)

Sampled = tuple[int, TokenLogprob | None]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@dataclass(slots=True)
class _Flat:
    """Host-side lists of one step's flattened batch, before they become tensors."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    lora_slots: list[int]
    sample_idx: list[int]
    sampled_seqs: list[int]  # index into batch.seqs of each sampled row


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        ckpt = resolve_checkpoint(config.model, config.cache_dir)
        self.model_config = cfg = ckpt.config
        self.checkpoint = ckpt
        self.max_model_len = min(config.max_model_len or min(cfg.max_position_embeddings, 8192),
                                 cfg.max_position_embeddings)
        if cfg.sliding_window:  # attention here is full-context: stay where that equals the sliding window
            self.max_model_len = min(self.max_model_len, cfg.sliding_window)
        self.model = LlamaModel(cfg, ckpt.tensors(self.device, self.dtype), config.quant, self.max_model_len,
                                self.device, self.dtype)
        self.block_size = config.block_size
        self.lora_cache = LoraSlotCache(cfg.linear_shapes(), cfg.num_layers, config.max_loras,
                                        config.lora_pool_rows or config.max_loras * config.max_lora_rank,
                                        self.device, self.dtype)
        for layer, slices in zip(self.model.layers, self.lora_cache.layers, strict=True):
            layer.lora = slices
        self.num_kv_blocks = self._size_kv_cache()
        # one block more than the block manager hands out: where the padding rows of a decode graph write
        self.model.allocate_kv_cache(self.num_kv_blocks + 1, self.block_size)
        self.max_model_len = min(self.max_model_len, self.num_kv_blocks * self.block_size)
        self._rng = torch.Generator().manual_seed(config.seed)
        self.graphs: DecodeGraphs | None = None
        if config.cuda_graphs and self.device.type == "cuda":
            self.graphs = self.decode_graphs(capture=True)

    def decode_graphs(self, capture: bool) -> DecodeGraphs:
        """Padded static decode steps, replayed from CUDA graphs (capture=False: run eagerly, for tests)."""
        return DecodeGraphs(self.model, self.lora_cache, self.num_kv_blocks, self.block_size, self.config.max_num_seqs,
                            -(-self.max_model_len // self.block_size), self.config.max_lora_rank, capture)

    def _size_kv_cache(self) -> int:
        cfg = self.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        per_block = 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim * elem
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * min(self.config.kv_cache_memory, 0.95)
        else:
            budget = self.config.kv_cache_memory * (1 << 30)
        blocks = int(budget // per_block)
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", blocks, self.block_size, blocks * per_block / 2**30)
        return max(blocks, 1)

    def execute(self, batch: ScheduledBatch) -> list[Sampled | None]:
        """Run one step; the sampled token of each sequence whose scheduled tokens reach its end."""
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_tokens[i] != 1)  # decodes first
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_tokens[i] for i in order]
        flat = self._flatten(seqs, counts)
        logits = None
        if self.graphs is not None and all(n == 1 for n in counts):
            logits = self.graphs.forward(seqs, flat.lora_slots, flat.input_ids, flat.positions, flat.slots)
        if logits is None:
            logits = self.model.forward(self._tensors(seqs, counts, flat))
        requests = [self._sample_request(seqs[i]) for i in flat.sampled_seqs]
        tokens, logprobs = sample(logits, requests)
        results: list[Sampled | None] = [None] * len(batch.seqs)
        for row, i in enumerate(flat.sampled_seqs):
            results[order[i]] = (tokens[row], logprobs[row])
        return results

    def _flatten(self, seqs: list[Sequence], counts: list[int]) -> _Flat:
        flat = _Flat([], [], [], [], [], [])
        bs = self.block_size
        for i, (seq, n) in enumerate(zip(seqs, counts, strict=True)):
            start = seq.num_computed
            flat.input_ids += seq.token_ids[start : start + n]
            flat.positions += range(start, start + n)
            flat.slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            flat.lora_slots += [seq.lora_slot] * n
            if start + n == len(seq):
                flat.sample_idx.append(len(flat.input_ids) - 1)
                flat.sampled_seqs.append(i)
        return flat

    def _tensors(self, seqs: list[Sequence], counts: list[int], flat: _Flat) -> ForwardBatch:
        dev = self.device
        num_decode = sum(1 for n in counts if n == 1)
        ctx = [seq.num_computed + n for seq, n in zip(seqs, counts, strict=True)]
        width = max((len(s.block_table) for s in seqs[:num_decode]), default=0)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs[:num_decode]]
        spans, start = [], num_decode
        for n, c in zip(counts[num_decode:], ctx[num_decode:], strict=True):
            spans.append((start, n, c))
            start += n
        attn = AttentionMeta(
            slot_mapping=torch.tensor(flat.slots, dtype=torch.int64, device=dev),
            num_decode=num_decode,
            decode_block_tables=torch.tensor(tables, dtype=torch.int64, device=dev).view(num_decode, width),
            decode_ctx_lens=torch.tensor(ctx[:num_decode], dtype=torch.int64, device=dev),
            prefill_spans=spans,
            prefill_block_tables=[torch.tensor(s.block_table, dtype=torch.int64, device=dev)
                                  for s in seqs[num_decode:]],
        )
        lora = None
        if any(s >= 0 for s in flat.lora_slots):
            cache = self.lora_cache
            lora = build_lora_meta(torch.tensor(flat.lora_slots, dtype=torch.int32, device=dev),
                                   cache.row_start, cache.scale, self.config.max_lora_rank)
        return ForwardBatch(
            input_ids=torch.tensor(flat.input_ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(flat.positions, dtype=torch.int64, device=dev),
            attn=attn,
            lora=lora,
            sample_idx=torch.tensor(flat.sample_idx, dtype=torch.int64, device=dev),
        )

    def prepare(self, seq: Sequence) -> None:
        """Per-request state the step needs (its random stream); raises for that request alone."""
        if seq.rng is None:
            seed = seq.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
            seq.rng = torch.Generator().manual_seed(seed)

    def _sample_request(self, seq: Sequence) -> SampleRequest:
        self.prepare(seq)
        return SampleRequest(seq.params, seq.rng)
