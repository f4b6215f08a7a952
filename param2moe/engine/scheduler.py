"""Continuous batching with chunked prefill and preemption.

Every step has a budget of tokens (max_num_batched_tokens). Running sequences come first, oldest
first: a decode takes one token, an unfinished prefill takes the next chunk. Waiting sequences are
then admitted, up to max_num_seqs, their prompts cut into chunks by what is left of the budget. When
the cache runs out of blocks, the newest running sequence is preempted: its blocks are freed and it
goes back to the head of the queue, to be recomputed later (from the prefix cache where it can).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, lora=None):
        self.bm = block_manager
        self.lora = lora  # a lora.LoRAManager: a sequence is admitted only once its adapter has a slot
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status == SeqStatus.RUNNING:
                seqs.append(seq)
                counts.append(n)
                budget -= n
        skipped: list[Sequence] = []  # their adapter has no free slot: they keep their place in the queue
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if self.lora is not None and not self.lora.acquire(seq):
                skipped.append(self.waiting.popleft())
                continue
            if not seq.block_table:
                self.bm.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.bm.allocate(seq, n):
                self.bm.free_seq(seq)  # give back the prefix blocks it took; it waits for room
                self._release_lora(seq)
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return ScheduledBatch(seqs, counts)

    def _release_lora(self, seq: Sequence) -> None:
        if self.lora is not None:
            self.lora.release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        self._release_lora(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is, and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        self._release_lora(seq)
        seq.status = SeqStatus.FINISHED
