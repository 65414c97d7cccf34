"""Continuous batching: which sequences compute which tokens in the next step.

Each step mixes two kinds of work in one forward pass:
- decode: every running sequence whose prompt is done computes its last token (and its MTP draft
  when speculating) - always scheduled, oldest first;
- prefill: the rest of the token budget (max_num_batched_tokens) goes to prompts, in chunks: first
  the ones already admitted, then new ones from the waiting queue.

The batch is shared fairly between groups (a group is a request, or every prompt of one client
request when the server says so): the next prompt admitted is the oldest of the group with the
fewest running sequences, so a small request does not queue behind the thousand prompts of a large
one. And a group with nothing running gets its slots at once if the batch is full: groups above
their fair share (max_batch_size / groups with work) are preempted down to it, newest first, as far
as that makes room.

Admission reserves cache blocks for a whole prompt (after prefix-cache hits; a prompt whose logprobs
are asked for takes none, since every position must be computed) and a batch slot for
each of its n completions; a prompt that does not fit waits, and so does everything behind it. When
a decoding sequence needs a new block and the pool is empty, the most recently admitted sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed from
its tokens later (its published blocks usually make that a prefix-cache hit). Since every request
fits the pool on its own, the oldest always progresses.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from nanoseek.engine.cache import BlockManager
from nanoseek.engine.sequence import FINISHED, RUNNING, WAITING, Sequence


@dataclass
class Batch:
    decode: list[Sequence] = field(default_factory=list)  # one uncomputed token each (+ a draft)
    # (sequence, tokens to compute)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)
    # copy-on-write block copies, to do first
    copies: list[tuple[int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_batch_size: int,
        max_num_batched_tokens: int,
        decode_width: int = 1,
    ):
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens  # per step, all sequences together
        # tokens a decoding sequence computes per step (2 with an MTP draft)
        self.decode_width = decode_width
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> Batch:
        self._make_room()
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
        counts = _groups(self.running)
        while self.waiting and budget > 0:
            seq = self._next_waiting(counts)
            slots = sum(counts.values()) + 1 + seq.pending_forks
            if slots > self.max_batch_size or not self.blocks.allocate(
                seq, use_prefix_cache=not seq.needs_prompt_logprobs
            ):
                break
            self.waiting.remove(seq)
            seq.status = RUNNING
            self.running.append(seq)
            counts[seq.request.group] += 1 + seq.pending_forks
            chunk = min(len(seq.token_ids) - seq.num_computed, budget)
            batch.prefill.append((seq, chunk))
            budget -= chunk
        return batch

    def _next_waiting(self, counts: Counter) -> Sequence:
        """The oldest waiting sequence of the group with the fewest running sequences (`counts`)."""
        best = self.waiting[0]
        fewest = counts[best.request.group]
        for seq in self.waiting:
            if not fewest:
                break
            running = counts[seq.request.group]
            if running < fewest:
                best = seq
                fewest = running
        return best

    def _make_room(self) -> None:
        """If the next sequence to admit belongs to a group with nothing running and the batch has
        no slots for it, preempt sequences of groups above their fair share (newest first) until it
        has them. A newcomer that asks for more than a fair share (n completions), or room that
        preemption cannot make, waits instead."""
        if not self.waiting:
            return
        counts = _groups(self.running)
        seq = self._next_waiting(counts)
        need = sum(counts.values()) + 1 + seq.pending_forks - self.max_batch_size
        if counts[seq.request.group] or need <= 0:
            return
        groups = set(counts) | {s.request.group for s in self.waiting}
        share = max(1, self.max_batch_size // len(groups))
        if 1 + seq.pending_forks > share or sum(max(0, c - share) for c in counts.values()) < need:
            return
        while need > 0:
            group = max(counts, key=counts.get)
            victim = next(s for s in reversed(self.running) if s.request.group == group)
            self.preempt(victim)
            counts[group] -= 1 + victim.pending_forks
            need -= 1 + victim.pending_forks

    def preempt(self, seq: Sequence) -> None:
        self.blocks.free_sequence(seq)
        seq.num_computed = 0
        seq.in_decode = False
        seq.draft = None
        seq.status = WAITING
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


def _groups(running: list[Sequence]) -> Counter:
    """Batch slots per group: its running sequences and the siblings they will fork (n > 1) once
    their prompt is computed."""
    counts = Counter()
    for s in running:
        counts[s.request.group] += 1 + s.pending_forks
    return counts
