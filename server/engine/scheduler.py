"""Continuous batching: which sequences run this step, and how many of their tokens."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hotlora.server.engine.block_manager import BlockManager
from hotlora.server.engine.sequence import Sequence, SequenceStatus

_NONE = object()  # no barrier (None is the base model's "adapter")


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work: seqs[i] computes its next num_tokens[i] uncomputed tokens.

    Decodes (one token) and prefill chunks of different sequences share the step.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    """Admission under a token budget and the KV-block supply, with preemption by recompute.

    `admit(seq)` is asked before a waiting sequence starts: it returns False while the sequence's
    adapter is not on the device yet (that sequence waits; the ones behind it are still admitted).
    `release(seq)` is called when a sequence stops running (finish, abort, preemption).

    Adapter residency: waiting sequences are tried in arrival order, except that those for which
    `ready(seq)` holds (base model, or adapter usable on the device) go before those whose adapter
    would have to be loaded, so a load never evicts an adapter that a queued request could use now.
    A sequence waiting `max_adapter_wait_steps` steps or more is overdue: overdue ones go first, and
    while one of them cannot get its adapter, no other adapter request is admitted (base requests
    are), so running sequences drain until a slot frees. That bounds every wait: no starvation (under the priority
    policy, within one priority).

    policy "priority" (vLLM's): each request's params.priority comes first, lower values first, in admission
    (the order above holds within one priority) and in preemption (the highest value, then the latest arrival,
    is preempted first). Requests of a lower priority wait while higher ones keep coming, as in vLLM.
    """

    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        admit: Callable[[Sequence], bool],
        release: Callable[[Sequence], None],
        ready: Callable[[Sequence], bool] | None = None,
        max_adapter_wait_steps: int = 64,
        continues: Callable[[Sequence], bool] | None = None,
        policy: str = "fcfs",
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.admit = admit
        self.release = release
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.ready = ready
        self.max_adapter_wait_steps = max_adapter_wait_steps
        self.continues = continues  # False: a running sequence whose token in flight is its last gets no step
        self.num_steps = 0
        self.num_adapter_blocked_steps = 0  # steps with room in the batch but every waiting request held back
        self._queued_at: dict[Sequence, int] = {}  # step at which each waiting sequence was (re)queued
        self.by_priority = policy == "priority"

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._queued_at[seq] = self.num_steps

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        self.num_steps += 1
        batch = ScheduledBatch()
        for seq in self.running:  # KV the last step computed becomes shareable before anyone is admitted
            self.blocks.commit(seq)
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        # arrival order, the newest preempted first; by priority, the lowest (highest value) preempted first, so a
        # request admitted later at a higher priority is served before a running lower one (vLLM's victim)
        queue = sorted(self.running, key=lambda s: (s.params.priority, s.arrival)) if self.by_priority \
            else list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            if self.continues is not None and not self.continues(seq):
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_allocate(seq, seq.num_computed + n):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.blocks.allocate(seq, seq.num_computed + n)
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                budget -= n
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        admitted, held = 0, False
        barrier: Any = _NONE  # the adapter an overdue sequence waits for: other adapters wait too
        for seq in self._admission_order():
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if barrier is not _NONE and seq.adapter is not None and seq.adapter is not barrier:
                held = True
                continue
            prefix = self.blocks.match(seq)  # cached KV of the longest known prefix: not computed again
            cached = len(prefix) * self.blocks.block_size
            n = min(seq.num_uncomputed - cached, budget)
            if not self.blocks.can_allocate(seq, cached + n, prefix):
                break  # blocks are handed out first come, first served
            if not self.admit(seq):
                held = True
                if barrier is _NONE and self._overdue(seq):
                    barrier = seq.adapter
                continue
            self.waiting.remove(seq)
            del self._queued_at[seq]
            self.blocks.start(seq, prefix, cached + n)
            seq.status = SequenceStatus.RUNNING
            if not seq.scheduled_ts:  # the queue time ends here; a re-admission after preemption keeps it
                seq.scheduled_ts = time.monotonic()
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
            admitted += 1
        if held and not admitted and budget > 0 and len(self.running) < self.max_num_seqs:
            self.num_adapter_blocked_steps += 1

    def _overdue(self, seq: Sequence) -> bool:
        return self.num_steps - self._queued_at[seq] >= self.max_adapter_wait_steps

    def _admission_order(self) -> list[Sequence]:
        """Overdue sequences first, then those ready to run, then the rest; arrival order within each (with the
        priority policy, all of that within each priority, lower values first)."""
        overdue = [s for s in self.waiting if self._overdue(s)]
        rest = [s for s in self.waiting if not self._overdue(s)]
        if self.ready is not None:
            rest.sort(key=lambda s: not self.ready(s))  # stable: FIFO within each class
        order = overdue + rest
        if self.by_priority:
            order.sort(key=lambda s: s.params.priority)  # stable: the order above within each priority
        return order

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        self.release(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self._queued_at[seq] = self.num_steps - self.max_adapter_wait_steps  # preempted: first in line again
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out and free what it holds."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.release(seq)
            self.release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self._queued_at.pop(seq, None)
        seq.status = SequenceStatus.FINISHED
        seq.finished_ts = time.monotonic()
