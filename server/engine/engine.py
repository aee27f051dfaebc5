"""LLMEngine: requests in, tokens out, one step at a time. Single-threaded; see async_engine for the server."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable

from hotlora.adapters.mixes import MixVersion
from hotlora.adapters.peft_format import AdapterError
from hotlora.adapters.registry import AdapterRegistry, UnknownAdapterError
from hotlora.adapters.versions import AdapterVersion
from hotlora.server.engine.block_manager import BlockManager
from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.detokenizer import Detokenizer, DetokState
from hotlora.server.engine.pacer import LaunchPacer
from hotlora.server.engine.scheduler import ScheduledBatch, Scheduler
from hotlora.server.engine.sequence import Sequence
from hotlora.server.engine.stats import EngineOverloadedError, EngineStats, InvalidRequestError, PromptTooLongError
from hotlora.server.engine.steptimer import StepTimer
from hotlora.server.engine.token_rules import NO_TOKEN_LEFT, refusal, token_rules
from hotlora.server.engine.types import ErrorKind, FinishReason, Request, RequestOutput, TokenLogprob
from hotlora.server.model.grammar import FILL_BUDGET_S, GrammarCache, allows_no_token, too_costly
from hotlora.server.model.runner import PLACEHOLDER, Launched, ModelRunner
from hotlora.server.model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

__all__ = ["EngineOverloadedError", "EngineStats", "InvalidRequestError", "LLMEngine", "PromptTooLongError",
           "UnknownAdapterError"]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.model_config = cfg = self.runner.model_config
        self.model_name = cfg.name
        self.max_model_len = self.runner.max_model_len
        self.tokenizer = load_tokenizer(config.tokenizer or self.runner.checkpoint.tokenizer_dir)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.registry = AdapterRegistry(self.runner.lora_cache, cfg.linear_shapes(), cfg.num_layers,
                                        config.max_lora_rank, config.max_cpu_lora_bytes)
        # the copy path's first-use costs (lazy kernel loading, the side stream's first segment) paid now, not by
        # the first adapter load under decode; None where it did not run (CPU, HOTLORA_WARM_ADAPTER_COPY=0)
        self.copy_warm_seconds = self.registry.warm_copy()
        self.blocks = BlockManager(self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   admit=self._admit, release=self._release, ready=self._adapter_ready,
                                   max_adapter_wait_steps=config.max_adapter_wait_steps, continues=self._continues,
                                   policy=config.scheduling_policy)
        self.eos_ids = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.runner.eos_ids = self.eos_ids
        self.grammars = None if self.tokenizer is None else GrammarCache(self.tokenizer, cfg.vocab_size, self.eos_ids)
        self.seqs: dict[str, Sequence] = {}
        self._arrivals = 0
        self._failed: list[tuple[Sequence, str]] = []
        self.timer = StepTimer()  # where each step's host time goes (hotlora_step_phase_seconds)
        # a step's launch returns before the device has computed it (CUDA): a caller may work on the previous
        # step's outputs from step()'s on_launch while the device runs (AsyncEngine does)
        self.defers_outputs = self.runner.device.type == "cuda"
        # asynchronous scheduling (see step): on an asynchronous device only; tests turn it on for the CPU
        self.async_scheduling = config.async_scheduling and self.defers_outputs
        self._inflight: Launched | None = None
        self.pacer = LaunchPacer()  # when the next step is needed (launch_delay)

    # --- requests ----------------------------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        """Queue a request. Raises InvalidRequestError, UnknownAdapterError or EngineOverloadedError."""
        self.add_requests([req])

    def add_requests(self, reqs: list[Request]) -> None:
        """Queue every request or none (the choices of one API request: one refused, none runs or is counted).
        Raises as add_request."""
        ids = [r.request_id for r in reqs]
        if len(set(ids)) < len(ids) or any(i in self.seqs for i in ids):
            raise InvalidRequestError(f"request ids {ids!r} repeat or are already in use")
        adapters = [self._check(r) for r in reqs]
        if len(self.scheduler.waiting) + len(reqs) > self.config.max_waiting:
            raise EngineOverloadedError(f"{len(self.scheduler.waiting)} requests are already waiting")
        for req, adapter in zip(reqs, adapters, strict=True):
            self._enqueue(req, adapter)

    def _check(self, req: Request) -> AdapterVersion | MixVersion | None:
        """Refuse what the engine cannot run; the adapter version the request names (None: the base)."""
        n = len(req.prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        if n >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {n} tokens; this model's context is {self.max_model_len} "
                                     "tokens, and at least one must be left to generate")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        p = req.params
        if p.priority and not self.scheduler.by_priority:  # as vLLM: a priority on a fcfs engine is refused
            raise InvalidRequestError("priority needs a server started with --scheduling-policy priority (this one "
                                      "schedules first come, first served)", "priority")
        if (refused := refusal(p.allowed_token_ids, p.bad_words_ids, vocab, p.logit_bias)) is not None:
            raise InvalidRequestError(*refused)
        if p.structured is not None and self.grammars is None:
            raise InvalidRequestError("structured outputs need the model's tokenizer, and this model has none")
        return self.registry.resolve(req.adapter) if req.adapter is not None else None

    def _enqueue(self, req: Request, adapter: AdapterVersion | MixVersion | None) -> None:
        if adapter is not None:
            self.registry.prefetch_version(adapter)  # the disk read starts now, not at the queue's head
        self._arrivals += 1
        seq = Sequence(req.request_id, list(req.prompt_token_ids), req.params, adapter, self._arrivals)
        # the prefix-cache namespace is the version the registry assigned, never the user's name for it:
        # a hot-swapped or re-created adapter gets a new id, so it never maps the old weights' KV
        seq.cache_ns = adapter.version if adapter is not None else None
        seq.queued_ts = req.arrival_time or time.monotonic()
        seq.detok = DetokState()
        seq.rules = token_rules(req.params.allowed_token_ids, req.params.bad_words_ids)
        self.seqs[req.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq)
            seq.finish_reason = FinishReason.ABORT

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    @property
    def in_flight(self) -> bool:
        """A launched step's outputs are still to come (asynchronous scheduling)."""
        return self._inflight is not None

    def idle(self) -> None:
        """Called by a driver before it waits for new work: adapter copies still queued (their issue after a
        launch found copy_lock busy, and the requests that wanted them are gone) are issued now, not at the
        next step, so that their slots become usable or evictable."""
        self.registry.cache.issue_pending()

    # --- the step ----------------------------------------------------------------------------------

    def step(self, on_launch: Callable[[], None] | None = None) -> list[RequestOutput]:
        """Schedule, launch the model once, and return what each touched request produced. on_launch runs on
        this thread once the step's device work is queued (not when nothing is scheduled).

        Asynchronous scheduling: a launched step is left in flight, and the next call schedules and launches
        its successor before it waits for it, so the host's scheduling, preparation and output work overlaps
        the device. A sequence's newest token is then still on the device when its next step is built: its
        token list ends in a PLACEHOLDER that the device fills in as that step's input, and that the host
        replaces once the token arrives. A sequence that stops there (EOS, a stop string) has one void step
        queued after it, whose result is dropped. Requests whose sampling reads their tokens on the host
        (grammars, penalties, min_tokens) wait for their step instead (_overlaps)."""
        timer = self.timer
        timer.begin()
        self.registry.poll()
        outputs: list[RequestOutput] = []
        prev, self._inflight = self._inflight, None
        overlapped = True
        if prev is not None and not self._overlaps(prev):
            outputs += self._complete(prev)
            prev, overlapped = None, False
        batch = self.scheduler.schedule()
        outputs += [self._fail(seq, msg, ErrorKind.ADAPTER) for seq, msg in self._failed]
        self._failed.clear()
        timer.mark("schedule")
        if batch:
            batch = self._prepare(batch, outputs)
        if not batch:
            if prev is not None:
                outputs += self._complete(prev)
            timer.skip()
            self.registry.cache.issue_pending()  # copies reserved by this schedule: no launch to hide them behind
            if not outputs:
                self._back_off()
            return outputs
        launched = self.runner.launch(batch, timer, prev)
        self._launched(launched)
        submitted = timer.at["prepare"]  # the forward was called: the step is queued on the device
        if overlapped:  # the build alone (no wait for the previous step inside it)
            self.pacer.built(submitted - timer.began)
        self.pacer.launched(launched, sum(batch.num_tokens), submitted, decode=max(batch.num_tokens) == 1)
        if on_launch is not None:
            on_launch()
        if self.async_scheduling:  # in flight from here: a failure while completing prev must not lose it
            self._inflight = launched
        if prev is not None:
            outputs += self._complete(prev)
        if not self.async_scheduling:
            outputs += self._complete(launched)
        timer.finish(sum(batch.num_tokens), busy=self.has_unfinished())
        return outputs

    def launch_delay(self) -> float:
        """Seconds a driver may wait (taking new requests) before the next step(): with a step in flight under
        asynchronous scheduling, until the host time a step's build takes before the device needs the next
        one, by the pacer's estimates (server/engine/pacer.py); else 0."""
        if self._inflight is None or not (self.async_scheduling and self.config.launch_pacing):
            return 0.0
        return self.pacer.delay(self._inflight, time.perf_counter())

    def _back_off(self) -> None:
        """Nothing ran: wait briefly for what holds the queue up rather than spin the caller's loop."""
        pending = self.registry.loading()
        if pending:  # only cold adapters hold the queue up: wait for one of them
            concurrent.futures.wait(pending, timeout=0.05, return_when=concurrent.futures.FIRST_COMPLETED)
        elif self.scheduler.waiting:
            time.sleep(0.005)  # every device slot is pinned or busy

    def _launched(self, launched: Launched) -> None:
        """The step's tokens count as computed from its launch; each sampling sequence gets a PLACEHOLDER."""
        for seq, n in zip(launched.batch.seqs, launched.batch.num_tokens, strict=True):
            seq.num_computed += n
        for row, i in enumerate(launched.sampled):
            seq = launched.batch.seqs[i]
            launched.rows[seq] = (row, len(seq.token_ids))
            seq.token_ids.append(PLACEHOLDER)

    def _complete(self, launched: Launched) -> list[RequestOutput]:
        """Wait for a launched step and turn its tokens into outputs (sequences finished or aborted meanwhile
        get none)."""
        wait_began = time.perf_counter()
        results = self.runner.collect(launched, self.timer)
        self.pacer.completed(launched, wait_began, self.timer.at["device_wait"])
        sampled_at = time.monotonic()  # the step's tokens are on the host
        outputs = []
        for seq, (row, index) in launched.rows.items():
            if seq.finished:
                continue
            token, logprob = results[launched.sampled[row]]
            if not seq.first_token_ts:
                seq.first_token_ts = sampled_at
            outputs.append(self._append(seq, index, token, logprob))
        self.timer.mark("postprocess")
        return outputs

    def _overlaps(self, launched: Launched) -> bool:
        """The next step may be built before `launched` completes: none of its sequences samples from host
        state that needs the token still on the device."""
        return not any(_host_sampled(seq) for seq in launched.rows if not seq.finished)

    def _continues(self, seq: Sequence) -> bool:
        """False for a sequence whose token in flight is certainly its last (max_tokens, the context): the
        scheduler gives it no next step."""
        if not seq.token_ids or seq.token_ids[-1] != PLACEHOLDER:
            return True
        return seq.num_generated < seq.params.max_tokens and len(seq) < self.max_model_len

    def _prepare(self, batch: ScheduledBatch, outputs: list[RequestOutput]) -> ScheduledBatch:
        """Per-request set-up of the step (the sampler's seed, the grammar matcher): a request that fails it fails
        alone, and the step goes on with the others."""
        failed = set()
        for seq in batch.seqs:
            try:
                self.runner.prepare(seq)
                if seq.params.structured is not None and seq.grammar is None:
                    seq.grammar = self.grammars.matcher(seq.params.structured)  # compiled already by the API
            except Exception as exc:
                log.warning("request %s failed while preparing a step: %s", seq.request_id, exc)
                outputs.append(self._fail(seq, f"the request could not be prepared: {exc}", ErrorKind.INTERNAL))
                failed.add(seq.request_id)
        if not failed:
            return batch
        keep = [i for i, seq in enumerate(batch.seqs) if seq.request_id not in failed]
        return ScheduledBatch([batch.seqs[i] for i in keep], [batch.num_tokens[i] for i in keep], batch.preempted)

    def _append(self, seq: Sequence, index: int, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        """The sampled `token` replaces seq's PLACEHOLDER at `index` (later ones may follow it: tokens of steps
        still in flight); stop checks and detokenization count the tokens up to it."""
        if seq.rules is not None and seq.rules.forbid(seq.token_ids, seq.num_prompt, index, token):
            return self._fail(seq, NO_TOKEN_LEFT, ErrorKind.INVALID)  # drawn from a row the masks left empty: not kept
        seq.token_ids[index] = token
        if logprob is not None:
            seq.logprobs.append(logprob)
        p = seq.params
        reason = None
        length, generated = index + 1, index + 1 - seq.num_prompt
        stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)
        if seq.grammar is not None:
            if too_costly(seq.grammar):
                return self._fail(seq, f"the request's grammar took over {FILL_BUDGET_S * 1000:.0f} ms of host time "
                                  "to apply to one token; simplify it (nested repetitions are the usual cause)",
                                  ErrorKind.INVALID)
            if not seq.grammar.accept_token(token):  # the bitmask forbids it: drawn only if it forbids all
                if seq.rules is not None:  # the masks and the grammar together left the row empty
                    return self._fail(seq, NO_TOKEN_LEFT, ErrorKind.INVALID)
                if allows_no_token(seq.grammar, self.model_config.vocab_size):
                    return self._fail(seq, "the request's grammar allows no token at this point", ErrorKind.INVALID)
                return self._fail(seq, f"token {token} does not fit the request's grammar", ErrorKind.INTERNAL)
            stop_token = stop_token or seq.grammar.is_terminated()
        if stop_token:
            reason = FinishReason.STOP
        elif generated >= p.max_tokens or length >= self.max_model_len:
            reason = FinishReason.LENGTH
        text, stopped = self.detokenizer.update(seq, final=reason is not None, drop_last=stop_token, end=length)
        if stopped:
            reason = FinishReason.STOP
        if reason is not None:
            del seq.token_ids[length:]  # placeholders of a void step queued after this one
            seq.finish_reason = reason
            self.scheduler.finish(seq)
            del self.seqs[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id, new_text=text, new_token_ids=[token], finished=reason is not None,
            finish_reason=reason, prompt_tokens=seq.num_prompt, completion_tokens=generated,
            logprobs=[logprob] if logprob is not None else None, cached_tokens=seq.num_cached_tokens,
            prompt_logprobs=seq.prompt_logprobs_output(generated),
            timing=seq.timing() if reason is not None else None,
        )

    def _fail(self, seq: Sequence, message: str, kind: ErrorKind) -> RequestOutput:
        while seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:  # tokens of steps in flight: void now
            seq.token_ids.pop()
        self.scheduler.finish(seq)
        self.seqs.pop(seq.request_id, None)
        seq.finish_reason = FinishReason.ABORT
        return RequestOutput(request_id=seq.request_id, new_text="", new_token_ids=[], finished=True,
                             finish_reason=FinishReason.ABORT, prompt_tokens=seq.num_prompt,
                             completion_tokens=seq.num_generated, error=message, error_kind=kind,
                             timing=seq.timing())

    # --- adapters: the scheduler's hooks ---------------------------------------------------------------

    def _admit(self, seq: Sequence) -> bool:
        if seq.adapter is None:
            return True
        try:
            slot = self.registry.acquire(seq.adapter)
        except AdapterError as exc:
            self._failed.append((seq, str(exc)))
            return False
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def _adapter_ready(self, seq: Sequence) -> bool:
        return seq.adapter is None or self.registry.is_ready(seq.adapter)

    def _release(self, seq: Sequence) -> None:
        if seq.lora_slot >= 0:
            self.registry.release(seq.adapter, seq.lora_slot)
            seq.lora_slot = -1

    # --- introspection and the offline API ----------------------------------------------------------

    @property
    def eager_steps(self) -> int:
        """Steps that ran eagerly, not from a CUDA graph (every step on the CPU)."""
        return self.runner.eager_steps

    def stats(self) -> EngineStats:
        def names(seqs) -> list[str]:
            return sorted({s.adapter.name for s in seqs if s.adapter is not None})

        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.blocks.num_blocks, kv_blocks_used=self.blocks.num_used,
            running_adapters=names(self.scheduler.running), waiting_adapters=names(self.scheduler.waiting),
            max_loras=self.config.max_loras, num_preemptions=self.scheduler.num_preemptions,
            lora_slots_used=self.registry.cache.num_held(),
            num_adapter_blocked_steps=self.scheduler.num_adapter_blocked_steps,
            adapter_load_seconds=self.registry.cache.stats.transitions,
            num_eager_steps=self.eager_steps, num_graph_steps=self.runner.graph_steps,
            prefix_cache_queries=self.blocks.queries, prefix_cache_hits=self.blocks.hits,
            block_size=self.config.block_size, kv_cache_dtype=self.config.kv_cache_dtype,
            step_phase_seconds=self.timer.phases, step_tokens=self.timer.tokens,
        )

    def generate(self, requests: list[Request]) -> list[RequestOutput]:
        """Run `requests` to completion; one accumulated output per request, in order."""
        for req in requests:
            self.add_request(req)
        done: set[str] = set()
        acc = {r.request_id: RequestOutput(r.request_id, "", [], prompt_tokens=len(r.prompt_token_ids))
               for r in requests}
        while len(done) < len(requests):
            for out in self.step():
                acc[out.request_id].absorb(out)
                if out.finished:
                    done.add(out.request_id)
        return [acc[r.request_id] for r in requests]


def _host_sampled(seq: Sequence) -> bool:
    """Its sampling reads its tokens on the host: a grammar matcher, or a history (SamplingParams.reads_history)."""
    return seq.params.structured is not None or seq.params.reads_history
