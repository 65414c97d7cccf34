"""MTP speculative decoding: the model's own MTP module drafts one token;
the next step checks it for free.

A decoding sequence with last token t at position p and draft d feeds [t, d] at positions p, p+1 in
one forward. The logits at p give token p+1; when d is accepted, the logits at p+1 give token p+2 as
well.

Acceptance keeps the output distribution exactly that of plain decoding. The draft is deterministic
(the MTP head's argmax), so d is accepted with probability P(d) under the processed distribution P
at p, and on rejection the token is drawn from P with d removed (P(x) / (1 - P(d))). Greedy decoding
accepts iff argmax P == d, so its output is token for token the plain output.

Drafting: at every position i of a step the MTP module sees the main model's final hidden state h_i
and token i+1 (the V3 MTP input), and writes its own latents to the cache's last layer; its output
at the last accepted position, through the shared head, is the next draft. A rejected draft leaves
stale latents at p+1 in both the main and the MTP layer; the next step writes that slot again before
anything reads it.
"""

from __future__ import annotations

import torch

from nanoseek.engine.runner import ModelRunner, StepInput
from nanoseek.engine.sampling import Row, Sampler


class SpeculativeDecoder:
    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.drafted = self.accepted = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def verify(
        self, logits: torch.Tensor, seqs: list, drafts: list[int]
    ) -> list[list[tuple[int, int]]]:
        """logits [2B, V]: rows 2i and 2i+1 are seqs[i] at p and p+1. -> per sequence,
        its new tokens as (token, logits row) pairs: [(d, 2i), (next, 2i+1)] when the
        draft is accepted, else [(other, 2i)]."""
        sampler = self.sampler
        rows = [Row(s.params, s.rng, s.token_ids, s.num_prompt) for s in seqs]
        first = sampler.apply_penalties(logits[0::2], rows)
        argmax = first.argmax(dim=-1).tolist()
        out: list[list[tuple[int, int]]] = [[] for _ in seqs]
        accepted = [i for i, s in enumerate(seqs) if s.params.greedy and argmax[i] == drafts[i]]
        for i, s in enumerate(seqs):
            if s.params.greedy and argmax[i] != drafts[i]:
                out[i].append((argmax[i], 2 * i))

        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            probs = sampler.probabilities(first[sampled], [rows[i] for i in sampled])
            d = torch.tensor([drafts[i] for i in sampled], device=probs.device).unsqueeze(1)
            p_draft = probs.gather(1, d).squeeze(1).tolist()
            rejected = []
            for j, i in enumerate(sampled):
                # accept with probability P(d); a draft holding all the mass is always accepted
                if seqs[i].rng.random() < p_draft[j] or p_draft[j] >= 1.0:
                    accepted.append(i)
                else:
                    rejected.append(j)
            if rejected:  # draw from P without the draft
                residual = probs[rejected].scatter(1, d[rejected], 0.0)
                tokens = sampler.draw(
                    residual, [seqs[sampled[j]].rng.random() for j in rejected]
                ).tolist()
                for j, t in zip(rejected, tokens):
                    out[sampled[j]].append((t, 2 * sampled[j]))

        accepted.sort()
        for i in accepted:
            out[i].append((drafts[i], 2 * i))
        if accepted:
            second_rows = [
                Row(
                    seqs[i].params, seqs[i].rng, seqs[i].token_ids, seqs[i].num_prompt, (drafts[i],)
                )
                for i in accepted
            ]
            tokens = sampler.sample(logits[[2 * i + 1 for i in accepted]], second_rows)
            for i, t in zip(accepted, tokens):
                out[i].append((t, 2 * i + 1))
        self.drafted += len(seqs)
        self.accepted += len(accepted)
        return out

    @staticmethod
    def draft(
        runner: ModelRunner,
        inp: StepInput,
        hidden: torch.Tensor,
        next_ids: list[int],
        rows: list[int],
    ) -> list[int]:
        """Run the MTP module over the step (next_ids[i]: the token after
        row i's) -> drafts from `rows`."""
        h = runner.mtp_forward(inp, hidden, torch.tensor(next_ids, device=hidden.device))
        return runner.logits(h[rows]).argmax(dim=-1).tolist() if rows else []
