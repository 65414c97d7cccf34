"""Continuous batching: which sequences compute which tokens in the next step.

Each step mixes two kinds of work in one forward pass:
- decode: every running sequence whose prompt is done computes its last token (and its MTP draft when
  speculating) - always scheduled, oldest first;
- prefill: the rest of the token budget (max_num_batched_tokens) goes to prompts, in chunks: first the ones
  already admitted, then new ones from the waiting queue, first come first served.

Admission reserves cache blocks for a whole prompt (after prefix-cache hits) and a batch slot for each of its
n completions; a prompt that does not fit waits, and so does everything behind it. When a decoding sequence
needs a new block and the pool is empty, the most recently admitted sequence is preempted: its blocks are freed
and it goes back to the front of the queue, to be recomputed from its tokens later (its published blocks usually
make that a prefix-cache hit). Since every request fits the pool on its own, the oldest always progresses.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nanoseek.engine.cache import BlockManager
from nanoseek.engine.sequence import FINISHED, RUNNING, WAITING, Sequence


@dataclass
class Batch:
    decode: list[Sequence] = field(default_factory=list)  # one uncomputed token each (+ a draft)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies, to do first

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_batched_tokens: int,
                 decode_width: int = 1):
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens  # per step, all sequences together
        self.decode_width = decode_width  # tokens a decoding sequence computes per step (2 with an MTP draft)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> Batch:
        batch = Batch()
        for seq in [s for s in self.running if s.in_decode]:
            while seq.status == RUNNING:
                copies = self.blocks.ensure_slots(seq, self.decode_width)
                if copies is not None:
                    batch.copies += copies
                    batch.decode.append(seq)
                    break
                self.preempt(self.running[-1])  # the newest; possibly seq itself
        budget = self.max_num_batched_tokens - self.decode_width * len(batch.decode)

        for seq in self.running:
            if budget <= 0:
                break
            if not seq.in_decode:
                chunk = min(len(seq.token_ids) - seq.num_computed, budget)
                batch.prefill.append((seq, chunk))
                budget -= chunk
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) + 1 + seq.pending_forks > self.max_batch_size or not self.blocks.allocate(seq):
                break
            self.waiting.popleft()
            seq.status = RUNNING
            self.running.append(seq)
            chunk = min(len(seq.token_ids) - seq.num_computed, budget)
            batch.prefill.append((seq, chunk))
            budget -= chunk
        return batch

    def preempt(self, seq: Sequence) -> None:
        self.blocks.free_sequence(seq)
        seq.num_computed, seq.in_decode, seq.draft, seq.status = 0, False, None, WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling joins the batch directly (its blocks are shared with its parent)."""
        seq.status = RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (done or cancelled) and give its blocks back at once."""
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = FINISHED
