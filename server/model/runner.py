"""The model runner: the one place where scheduled sequences become tensors and tokens come back."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch

from hotlora.adapters.cache import LoraSlotCache
from hotlora.kernels.lora import build_lora_meta, rank_classes
from hotlora.kernels.reference import FP8_KV
from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.scheduler import ScheduledBatch
from hotlora.server.engine.sequence import Sequence
from hotlora.server.engine.steptimer import StepTimer
from hotlora.server.engine.types import SEED_MAX, SEED_MIN, TokenLogprob
from hotlora.server.model.attention import AttentionMeta
from hotlora.server.model.graphs import StepGraphs, StepInput, step_rank_class
from hotlora.server.model.history import TokenHistory
from hotlora.server.model.llama import ForwardBatch, LlamaModel
from hotlora.server.model.sampler import PendingSample, SampleRequest, launch_sample
from hotlora.server.model.weights import resolve_checkpoint

log = logging.getLogger(__name__)

Sampled = tuple[int, TokenLogprob | None]
PLACEHOLDER = -1  # a token id not known on the host yet: the device fills it in from a queued step's sample


@dataclass(slots=True)
class Launched:
    """A step queued on the device: which of batch.seqs sample a token (one row each, in order), and the
    pending sample. The engine appends each sampled sequence's PLACEHOLDER and notes it in `rows`."""

    batch: ScheduledBatch
    sampled: list[int]  # index in batch.seqs of each sampled row
    pending: PendingSample
    rows: dict[Sequence, tuple[int, int]] = field(default_factory=dict)  # seq -> (row, index in token_ids)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = pick_device(config.device)
        config.for_device(self.device.type)
        self.dtype = pick_dtype(config.dtype, self.device)
        self.kv_dtype = FP8_KV if config.kv_cache_dtype.startswith("fp8") else self.dtype
        ckpt = resolve_checkpoint(config.model, config.cache_dir)
        self.model_config = cfg = ckpt.config
        self.checkpoint = ckpt
        self.max_model_len = min(config.max_model_len or min(cfg.max_position_embeddings, 8192),
                                 cfg.max_position_embeddings)
        self.model = LlamaModel(cfg, ckpt.tensors(self.device, self.dtype), config.quant, self.max_model_len,
                                self.device, self.dtype)
        self.block_size = config.block_size
        self.lora_cache = LoraSlotCache(cfg.linear_shapes(), cfg.num_layers, config.max_loras,
                                        config.lora_pool_rows or config.max_loras * config.max_lora_rank,
                                        self.device, self.dtype)
        for layer, slices in zip(self.model.layers, self.lora_cache.layers, strict=True):
            layer.lora = slices
        # LoRA tiles sized by each step's largest adapter rank (graphs.step_rank_class); off: by max_lora_rank
        classes = rank_classes(config.max_lora_rank)
        self.rank_classes = classes if config.lora_rank_classes else classes[-1:]
        self.num_kv_blocks = self._size_kv_cache()
        # one block more than the block manager hands out: where the padding tokens of a graph step write
        self.model.allocate_kv_cache(self.num_kv_blocks + 1, self.block_size, self.kv_dtype)
        self.max_model_len = min(self.max_model_len, self.num_kv_blocks * self.block_size)
        self._seeds = random.Random(config.seed)  # unseeded requests' seeds: reproducible for one engine seed
        self.eos_ids: set[int] = set(cfg.eos_token_ids)  # masked until min_tokens (the engine adds the tokenizer's)
        self.eager_steps = 0  # steps run eagerly (no CUDA graph fitted, graphs off, or a capture failed)
        self.graph_steps = 0  # steps run on the padded static path (replayed from CUDA graphs on cuda)
        # steps of at most this many tokens run on one intra-op thread on the CPU (measured: NF4 decode up to
        # batch 8 gained, fp32 batch 8 lost, as its matmuls are big enough to share)
        self._cpu_single_thread_tokens = 8 if config.quant == "nf4" else 1
        self.graphs: StepGraphs | None = None
        self._history = TokenHistory()  # the token ids that the penalties and min_tokens read
        if config.cuda_graphs and self.device.type == "cuda":
            self.graphs = self.step_graphs(capture=True)
            self.graphs.capture_all()

    def step_graphs(self, capture: bool) -> StepGraphs:
        """Padded static steps, replayed from CUDA graphs (capture=False: run eagerly, for tests)."""
        cfg = self.config
        return StepGraphs(self.model, self.lora_cache, self.num_kv_blocks, self.block_size, cfg.max_num_seqs,
                          cfg.max_num_batched_tokens, -(-self.max_model_len // self.block_size),
                          _pow2(self.max_model_len), cfg.max_lora_rank, self.rank_classes, capture)  # fmt: skip

    def _size_kv_cache(self) -> int:
        cfg = self.model_config
        elem = torch.tensor([], dtype=self.kv_dtype).element_size()
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

    def launch(self, batch: ScheduledBatch, timer: StepTimer, after: Launched | None = None) -> Launched:
        """Queue one step (on the CPU: compute it). `after`: a step still in flight, whose sampled tokens are
        the inputs of this step's PLACEHOLDER positions (copied on the device, behind it)."""
        threads = torch.get_num_threads()
        small = self.device.type == "cpu" and sum(batch.num_tokens) <= self._cpu_single_thread_tokens
        if small and threads > 1:
            # a small CPU step's ops are too short to amortize waking and joining intra-op threads: on a
            # 2-core host, batch-1 decode ran 1.9x faster on one thread (bench/engine_cpu.py --suite); the
            # lm_head keeps them all (an fp32 [8, 576] x [576, 49152] product took 28 ms on one thread)
            torch.set_num_threads(1)
            self.model.head_threads = threads
        try:
            step, sampled, feed = self._flatten(batch.seqs, batch.num_tokens, after)
            logits = self._forward(batch.seqs, step, timer, feed, after)
            requests = [self._sample_request(batch.seqs[i]) for i in sampled]
            pending = launch_sample(logits, requests, self.eos_ids)
            # adapter copies reserved while scheduling this step: their host work (queueing the transfer and the
            # pool writes on the copy stream) runs now, while the device computes the step
            self.lora_cache.issue_pending(wait=False)
        finally:
            if small and threads > 1:
                torch.set_num_threads(threads)
                self.model.head_threads = 0
        timer.mark("launch")
        return Launched(batch, sampled, pending)

    def collect(self, launched: Launched, timer: StepTimer) -> list[Sampled | None]:
        """Wait for a launched step; per batch sequence its (token, logprob), or None if it sampled nothing."""
        launched.pending.wait()
        timer.mark("device_wait")
        tokens, logprobs = launched.pending.finish()
        results: list[Sampled | None] = [None] * len(launched.batch.seqs)
        for row, i in enumerate(launched.sampled):
            results[i] = (tokens[row], logprobs[row])
        timer.mark("sample")
        return results

    def _forward(self, seqs: list[Sequence], step: StepInput, timer: StepTimer, feed: tuple[list[int], list[int]],
                 after: Launched | None) -> torch.Tensor:
        """Logits [len(step.sample_idx), V] of the step: replayed from a graph, else eagerly. Marks prepare
        once the device metadata is written (the launch phase starts with the forward call)."""
        scored = self._prompt_rows(seqs, step.q_lens)
        # a step that scores prompt tokens needs logits at more rows than the graphs hold: it runs eagerly
        bucket = self.graphs.stage(step) if self.graphs is not None and not scored else None
        if bucket is not None:
            self.graph_steps += 1
            self._feed(bucket.batch.input_ids, feed, after)
            timer.mark("prepare")
            return self.graphs.replay(bucket, len(step.sample_idx))
        self.eager_steps += 1
        rows = len(step.sample_idx)
        step.sample_idx += [flat for _, flat, _ in scored]
        tensors = self._tensors(step)
        self._feed(tensors.input_ids, feed, after)
        timer.mark("prepare")
        logits = self.model.forward(tensors)
        if scored:  # its host sync lands in launch (only steps that score prompt tokens)
            self._score_prompts(seqs, scored, logits[rows:])
            logits = logits[:rows]
        return logits

    @staticmethod
    def _feed(input_ids: torch.Tensor, feed: tuple[list[int], list[int]], after: Launched | None) -> None:
        """input_ids[dst] = the in-flight step's sampled ids at rows src, queued on the device behind it."""
        dst, src = feed
        if not dst:
            return
        dev = input_ids.device
        rows = torch.tensor(src, dtype=torch.int64).to(dev, non_blocking=True)
        input_ids.index_copy_(0, torch.tensor(dst, dtype=torch.int64).to(dev, non_blocking=True),
                              after.pending.tokens.index_select(0, rows))

    def _flatten(self, seqs: list[Sequence], counts: list[int], after: Launched | None = None
                 ) -> tuple[StepInput, list[int], tuple[list[int], list[int]]]:
        """The step as host lists, the index in seqs of each sampled row, and the (flat index, row of
        `after`'s sample) of each input that is a PLACEHOLDER for a token still being sampled."""
        step = StepInput([], [], [], [], [], list(counts), [], [], self._lora_class(seqs))
        sampled: list[int] = []
        dst: list[int] = []
        src: list[int] = []
        pending = after.rows if after is not None else {}
        bs = self.block_size
        for i, (seq, n) in enumerate(zip(seqs, counts, strict=True)):
            start = seq.num_computed
            if seq in pending:
                row, index = pending[seq]
                if start <= index < start + n:
                    dst.append(len(step.input_ids) + index - start)
                    src.append(row)
            step.input_ids += seq.token_ids[start : start + n]
            step.positions += range(start, start + n)
            step.slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            step.lora_slots += [seq.lora_slot] * n
            step.ctx_lens.append(start + n)
            step.tables.append(seq.block_table)
            if start + n == len(seq):
                step.sample_idx.append(len(step.input_ids) - 1)
                sampled.append(i)
        return step, sampled, (dst, src)

    def _lora_class(self, seqs: list[Sequence]) -> int:
        """The step's LoRA rank class, from the host ranks of its distinct adapter slots (no device read)."""
        slots = {seq.lora_slot for seq in seqs if seq.lora_slot >= 0}
        if not slots:
            return 0
        rank = max(self.lora_cache.batch_rank(slots), 1)
        return step_rank_class(rank, self.rank_classes)

    def _prompt_rows(self, seqs: list[Sequence], counts: list[int]) -> list[tuple[int, int, int]]:
        """(index in seqs, flat token index, next prompt token) of each scheduled prompt position whose logits
        score the prompt token after it and are not kept yet (a recompute after preemption scores nothing
        twice). A sequence's rows come in prompt order."""
        rows, offset = [], 0
        for i, (seq, n) in enumerate(zip(seqs, counts, strict=True)):
            if seq.scoring_prompt:
                start = seq.num_computed
                first, end = max(start, len(seq.prompt_logprobs)), min(start + n, seq.num_prompt - 1)
                rows += [(i, offset + p - start, seq.token_ids[p + 1]) for p in range(first, end)]
            offset += n
        return rows

    def _score_prompts(self, seqs: list[Sequence], rows: list[tuple[int, int, int]], logits: torch.Tensor,
                       chunk: int = 256) -> None:
        """Append to each scoring sequence the logprobs of its next prompt tokens (the model's own
        distribution, as for sampled tokens). logits [len(rows), V] float32, row j from rows[j]'s position."""
        top = max(seqs[i].params.prompt_logprobs for i, _, _ in rows)
        targets = torch.tensor([t for _, _, t in rows], dtype=torch.int64).to(logits.device, non_blocking=True)
        blocks = []  # per row: the target's logprob, then `top` alternative ids, then their logprobs
        for c in range(0, len(rows), chunk):  # slices bound the [rows, V] log-softmax temporaries
            lp = torch.log_softmax(logits[c : c + chunk], dim=-1)
            parts = [lp.gather(1, targets[c : c + chunk, None])]
            if top:
                values, ids = torch.topk(lp, top, dim=-1)
                parts += [ids, values]
            blocks.append(torch.cat([t.double() for t in parts], dim=1))
        flat = torch.cat(blocks).tolist()  # the step's one device -> host copy of them (ids exact in float64)
        for (i, _, token), row in zip(rows, flat, strict=True):
            k = seqs[i].params.prompt_logprobs
            pairs = [(int(t), v) for t, v in zip(row[1 : 1 + k], row[1 + top : 1 + top + k], strict=True)]
            seqs[i].prompt_logprobs.append(TokenLogprob(token_id=token, logprob=row[0], top=pairs))

    def _tensors(self, step: StepInput) -> ForwardBatch:
        """The unpadded eager batch."""
        dev = self.device
        cu = [0]
        for n in step.q_lens:
            cu.append(cu[-1] + n)
        width = max(len(t) for t in step.tables)
        tables = [t + [0] * (width - len(t)) for t in step.tables]
        max_q = max(step.q_lens)
        attn = AttentionMeta(
            slot_mapping=torch.tensor(step.slots, dtype=torch.int64, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            ctx_lens=torch.tensor(step.ctx_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            max_q_len=1 if max_q == 1 else _pow2(max_q),
            max_ctx_len=_pow2(max(step.ctx_lens)),
        )
        lora = None
        if step.lora_class:  # the class a graph of this step would have: the same tiles eager or replayed
            cache = self.lora_cache
            lora = build_lora_meta(torch.tensor(step.lora_slots, dtype=torch.int32, device=dev),
                                   cache.row_start, cache.scale, self.config.max_lora_rank,
                                   rank_class=step.lora_class)
        return ForwardBatch(
            input_ids=torch.tensor(step.input_ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(step.positions, dtype=torch.int64, device=dev),
            attn=attn,
            lora=lora,
            sample_idx=torch.tensor(step.sample_idx, dtype=torch.int64, device=dev),
        )

    def prepare(self, seq: Sequence) -> None:
        """Per-request state the step needs (its sampling seed); raises for that request alone."""
        if seq.sampling_seed is None:
            seed = seq.params.seed
            if seed is None:
                seed = self._seeds.getrandbits(64)
            elif not SEED_MIN <= seed <= SEED_MAX:
                raise ValueError(f"seed {seed} is outside [{SEED_MIN}, {SEED_MAX}]")
            seq.sampling_seed = seed

    def _sample_request(self, seq: Sequence) -> SampleRequest:
        self.prepare(seq)
        p, seed, index = seq.params, seq.sampling_seed, seq.num_generated
        if not p.reads_history:
            return SampleRequest(p, seed, index, grammar=seq.grammar)  # no processor needs the token history
        ids = self._history.ids(seq)  # views: no per-step copy of the history into Python lists
        return SampleRequest(p, seed, index, ids[: seq.num_prompt], ids[seq.num_prompt :], seq.grammar)
