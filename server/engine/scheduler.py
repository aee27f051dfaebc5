"""Continuous batching: which sequences run this step, and how many of their tokens."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hotlora.server.engine.block_manager import BlockManager
from hotlora.server.engine.sequence import Sequence, SequenceStatus


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
    """FIFO admission under a token budget and the KV-block supply, with preemption by recompute.

    `admit(seq)` is asked before a waiting sequence starts: it returns False while the sequence's
    adapter is not on the device yet (that sequence waits; the ones behind it are still admitted).
    `release(seq)` is called when a sequence stops running (finish, abort, preemption).
    """

    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        admit: Callable[[Sequence], bool],
        release: Callable[[Sequence], None],
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.admit = admit
        self.release = release
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        for seq in self.running:  # KV the last step computed becomes shareable before anyone is admitted
            self.blocks.commit(seq)
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        queue = list(self.running)  # arrival order; the newest is preempted first
        while queue and budget > 0:
            seq = queue.pop(0)
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
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = self.blocks.match(seq)  # cached KV of the longest known prefix: not computed again
            cached = len(prefix) * self.blocks.block_size
            n = min(seq.num_uncomputed - cached, budget)
            if not self.blocks.can_allocate(seq, cached + n, prefix):
                break  # blocks are handed out first come, first served
            self.waiting.popleft()
            if not self.admit(seq):
                skipped.append(seq)
                continue
            self.blocks.start(seq, prefix, cached + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        self.release(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out and free what it holds."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.release(seq)
            self.release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
